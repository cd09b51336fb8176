//! How much GPU memory a llama.cpp server will take for a GGUF model, from the header alone:
//! before the model has ever been loaded, so admission reserves a figure close to the truth
//! instead of everything free, and `vramgate plan` can say whether a set of models fits.
//!
//! The estimate is the sum of four documented terms (docs/configuration.md, "Estimates"):
//!
//! - **weights**: each offloaded tensor's data, from its element count and ggml type (blocks of
//!   `block` elements taking `bytes` each, as ggml lays them out). The input embedding
//!   (`token_embd`) stays in host memory (but a copy serves as the output head of a model without
//!   one); layer `N` is on the GPU when `N < gpu_layers`; the other tensors (output, final norm)
//!   when every layer is (`gpu_layers > block_count`). Other model files the server loads (a
//!   projector, a draft model) count at their size on disk.
//! - **KV cache**: `context × Σ over offloaded layers of kv_heads × (key_length × K + value_length
//!   × V)` bytes, where K and V are the bytes per element of the cache types (`f16`: 2).
//! - **compute buffer**: `ubatch × 4 × (vocab + 4 × embedding)` bytes: the logits and the
//!   activations of one micro-batch in f32. An approximation: the learned correction absorbs
//!   the rest.
//! - **runtime overhead**: a fixed [`RUNTIME_OVERHEAD_MIB`] for the CUDA context and ggml's own
//!   buffers, present whenever anything is offloaded.
//!
//! Pure: no I/O. The caller reads the header ([`super::read_file`]) and the launch flags.

use super::{GgufInfo, Shape};

/// What the CUDA context and ggml's fixed buffers take in a server process, beyond the model.
pub const RUNTIME_OVERHEAD_MIB: u64 = 256;
/// llama.cpp's default micro-batch (`-ub`/`--ubatch-size`).
const DEFAULT_UBATCH: u64 = 512;
/// The most layers `-ngl` can mean: llama.cpp treats anything past the model's layers as "all".
const ALL_LAYERS: u64 = u64::MAX;
const MIB: u64 = 1 << 20;

/// The launch flags of a llama.cpp server that change its footprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// `-c`/`--ctx-size`; `None` or 0 = the model's trained context.
    pub context: Option<u64>,
    /// `-ngl`/`--n-gpu-layers`/`--gpu-layers`; `None` = every layer (vramgate's assumption for a
    /// model it places on a GPU).
    pub gpu_layers: Option<u64>,
    /// `-ctk`/`--cache-type-k`.
    pub cache_type_k: CacheType,
    /// `-ctv`/`--cache-type-v`.
    pub cache_type_v: CacheType,
    /// `-ub`/`--ubatch-size`.
    pub ubatch: Option<u64>,
    /// What other model files the server loads onto the GPU take (a `--mmproj` projector, a
    /// `-md` draft model): their size on disk, filled in by whoever can look at files.
    pub extra_bytes: u64,
}

impl Default for Launch {
    fn default() -> Launch {
        Launch {
            context: None,
            gpu_layers: None,
            cache_type_k: CacheType::F16,
            cache_type_v: CacheType::F16,
            ubatch: None,
            extra_bytes: 0,
        }
    }
}

/// A KV-cache element type, with its size as a fraction (bytes per block of elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    /// 4 bytes.
    F32,
    /// 2 bytes (llama.cpp's default).
    F16,
    /// 2 bytes.
    Bf16,
    /// 34 bytes per 32.
    Q8_0,
    /// 18 bytes per 32.
    Q4_0,
    /// 20 bytes per 32.
    Q4_1,
    /// 18 bytes per 32.
    Iq4Nl,
    /// 22 bytes per 32.
    Q5_0,
    /// 24 bytes per 32.
    Q5_1,
}

impl CacheType {
    /// Parses llama.cpp's name for it (`f16`, `q8_0`, ...).
    pub fn parse(name: &str) -> Option<CacheType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => CacheType::F32,
            "f16" => CacheType::F16,
            "bf16" => CacheType::Bf16,
            "q8_0" => CacheType::Q8_0,
            "q4_0" => CacheType::Q4_0,
            "q4_1" => CacheType::Q4_1,
            "iq4_nl" => CacheType::Iq4Nl,
            "q5_0" => CacheType::Q5_0,
            "q5_1" => CacheType::Q5_1,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            CacheType::F32 => (1, 4),
            CacheType::F16 | CacheType::Bf16 => (1, 2),
            CacheType::Q8_0 => (32, 34),
            CacheType::Q4_0 | CacheType::Iq4Nl => (32, 18),
            CacheType::Q4_1 => (32, 20),
            CacheType::Q5_0 => (32, 22),
            CacheType::Q5_1 => (32, 24),
        }
    }
}

/// ggml's layout of a tensor type: (elements per block, bytes per block); `None` for a type
/// number this estimate does not know (the estimate is then refused, never guessed).
pub fn type_size(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// The estimate, term by term (bytes), with what it was computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// The offloaded tensors' data.
    pub weights_bytes: u64,
    /// The KV cache at `context`.
    pub kv_cache_bytes: u64,
    /// The KV cache per token of context (what one more token of `-c` costs).
    pub kv_bytes_per_token: u64,
    /// The compute buffer.
    pub compute_bytes: u64,
    /// The fixed runtime overhead (0 when nothing is offloaded).
    pub overhead_bytes: u64,
    /// The context the KV cache was sized for.
    pub context: u64,
    /// The layers on the GPU.
    pub gpu_layers: u64,
}

impl Estimate {
    /// The whole footprint in MiB, rounded up.
    pub fn total_mib(&self) -> u64 {
        let bytes = self
            .weights_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.compute_bytes)
            .saturating_add(self.overhead_bytes);
        bytes.div_ceil(MIB)
    }

    /// The largest context (a multiple of 256, as llama.cpp pads it) whose footprint fits in
    /// `budget_mib`, or `None` when even the fixed terms do not fit.
    pub fn context_fitting(&self, budget_mib: u64) -> Option<u64> {
        let fixed = self.weights_bytes.saturating_add(self.compute_bytes).saturating_add(self.overhead_bytes);
        let room = budget_mib.saturating_mul(MIB).checked_sub(fixed)?;
        if self.kv_bytes_per_token == 0 {
            return Some(self.context);
        }
        let tokens = room / self.kv_bytes_per_token;
        let padded = tokens / 256 * 256;
        (padded > 0).then_some(padded)
    }
}

/// Estimates the footprint of `info`'s model launched with `launch`. Errors say which header
/// figure is missing or which tensor type is unknown.
pub fn estimate(info: &GgufInfo, launch: &Launch) -> Result<Estimate, String> {
    let shape = &info.shape;
    let layers = shape.block_count.ok_or("the header has no block_count (the number of layers)")?;
    if layers > super::MAX_LAYERS {
        return Err(format!("the header says {layers} layers; at most {} are accepted", super::MAX_LAYERS));
    }
    let gpu_layers = launch.gpu_layers.unwrap_or(ALL_LAYERS).min(layers.saturating_add(1));
    let on_gpu = |tensor: &super::TensorInfo| match tensor.layer {
        _ if tensor.input_embedding => false,
        Some(layer) => layer < gpu_layers,
        None => gpu_layers > layers,
    };
    let mut weights_bytes: u64 = 0;
    for tensor in info.tensors.iter().filter(|t| on_gpu(t)) {
        weights_bytes = weights_bytes.saturating_add(tensor_bytes(tensor)?);
    }
    // Tied embeddings: without an output head, llama.cpp puts a copy of the input embedding on
    // the GPU to serve as one (when the output layer is offloaded).
    if gpu_layers > layers && !info.tensors.iter().any(|t| t.output_head) {
        for tensor in info.tensors.iter().filter(|t| t.input_embedding) {
            weights_bytes = weights_bytes.saturating_add(tensor_bytes(tensor)?);
        }
    }
    weights_bytes = weights_bytes.saturating_add(launch.extra_bytes);
    let context = match launch.context {
        Some(context) if context > 0 => context,
        _ => info.context_length.ok_or("no -c/--ctx-size and the header has no context_length")?,
    };
    let kv_bytes_per_token = kv_bytes_per_token(shape, layers.min(gpu_layers), launch)?;
    let kv_cache_bytes = kv_bytes_per_token.saturating_mul(context);
    let embedding = shape.embedding_length.ok_or("the header has no embedding_length")?;
    let vocab = shape.vocab_size.ok_or("the header has no vocab_size and no tokenizer.ggml.tokens")?;
    let ubatch = launch.ubatch.filter(|u| *u > 0).unwrap_or(DEFAULT_UBATCH);
    let offloaded = gpu_layers > 0;
    let compute_bytes = if offloaded {
        ubatch.saturating_mul(4).saturating_mul(vocab.saturating_add(embedding.saturating_mul(4)))
    } else {
        0
    };
    let overhead_bytes = if offloaded { RUNTIME_OVERHEAD_MIB * MIB } else { 0 };
    Ok(Estimate {
        weights_bytes,
        kv_cache_bytes,
        kv_bytes_per_token,
        compute_bytes,
        overhead_bytes,
        context,
        gpu_layers,
    })
}

/// What a tensor's data takes, as ggml lays out its type; an unknown type is an error.
fn tensor_bytes(tensor: &super::TensorInfo) -> Result<u64, String> {
    let (block, bytes) = type_size(tensor.ggml_type)
        .ok_or_else(|| format!("tensor type {} is unknown to the estimate", tensor.ggml_type))?;
    Ok(tensor.elements.div_ceil(block).saturating_mul(bytes))
}

/// The KV cache's bytes per token over the first `layers` layers.
fn kv_bytes_per_token(shape: &Shape, layers: u64, launch: &Launch) -> Result<u64, String> {
    let heads = |values: &[u64], layer: u64| -> Option<u64> {
        match values {
            [] => None,
            [one] => Some(*one),
            many => usize::try_from(layer).ok().and_then(|l| many.get(l)).copied(),
        }
    };
    let embedding = shape.embedding_length.ok_or("the header has no embedding_length")?;
    let (k_block, k_bytes) = launch.cache_type_k.block();
    let (v_block, v_bytes) = launch.cache_type_v.block();
    let mut total: u64 = 0;
    for layer in 0..layers {
        let query_heads = heads(&shape.head_count, layer).ok_or("the header has no attention.head_count")?;
        // Grouped-query attention has fewer KV heads; without the key, every head is one.
        let kv_heads = heads(&shape.head_count_kv, layer).unwrap_or(query_heads);
        if kv_heads == 0 {
            // A layer without attention (a recurrent or sliding-state layer) keeps no KV cache.
            continue;
        }
        let per_head = embedding.checked_div(query_heads).ok_or("attention.head_count is 0")?;
        let key = shape.key_length.unwrap_or(per_head);
        let value = shape.value_length.unwrap_or(per_head);
        let k = kv_heads.saturating_mul(key).div_ceil(k_block).saturating_mul(k_bytes);
        let v = kv_heads.saturating_mul(value).div_ceil(v_block).saturating_mul(v_bytes);
        total = total.saturating_add(k).saturating_add(v);
    }
    Ok(total)
}

/// Reads the footprint flags from a llama.cpp server's arguments. Errors name the flag and the
/// value that is not understood.
pub fn launch_from_args<S: AsRef<str>>(args: &[S]) -> Result<Launch, String> {
    let mut launch = Launch::default();
    let mut index = 0;
    while let Some(arg) = args.get(index) {
        let arg = arg.as_ref();
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
            _ => (arg, None),
        };
        let known = matches!(
            flag,
            "-c" | "--ctx-size"
                | "-ngl"
                | "--n-gpu-layers"
                | "--gpu-layers"
                | "-ctk"
                | "--cache-type-k"
                | "-ctv"
                | "--cache-type-v"
                | "-ub"
                | "--ubatch-size"
        );
        if !known {
            index += 1;
            continue;
        }
        let value = match inline {
            Some(value) => value,
            None => {
                index += 1;
                args.get(index).map(AsRef::as_ref).ok_or_else(|| format!("{flag} has no value"))?
            }
        };
        let number = || value.parse::<u64>().map_err(|_| format!("{flag} {value}: not a whole number"));
        match flag {
            "-c" | "--ctx-size" => launch.context = Some(number()?),
            // llama.cpp takes "-1", "auto" and "all" for every layer.
            "-ngl" | "--n-gpu-layers" | "--gpu-layers" => {
                launch.gpu_layers = if matches!(value, "-1" | "auto" | "all") { None } else { Some(number()?) }
            }
            "-ub" | "--ubatch-size" => launch.ubatch = Some(number()?),
            _ => {
                let cache = CacheType::parse(value)
                    .ok_or_else(|| format!("{flag} {value}: not a cache type llama.cpp knows"))?;
                if matches!(flag, "-ctk" | "--cache-type-k") {
                    launch.cache_type_k = cache;
                } else {
                    launch.cache_type_v = cache;
                }
            }
        }
        index += 1;
    }
    Ok(launch)
}
