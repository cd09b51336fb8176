//! A small, bounded reader of a GGUF file's header: the few metadata keys `/api/show` and
//! `/api/tags` report (architecture, name, file type, context length, parameter count), and the
//! shape and tensor types the footprint estimate needs ([`estimate`]). It reads
//! the header only (never a tensor's data), refuses anything malformed with an error that names
//! what was wrong and where (never a panic), and caps every count and length it is given, so a
//! hostile or damaged file cannot make it allocate or loop without bound.
//!
//! The layout (GGUF versions 2 and 3, little-endian): the magic `GGUF`, a `u32` version, a `u64`
//! tensor count, a `u64` metadata count; then each metadata entry (a string key, a `u32` value
//! type, the value); then each tensor's info (name, dimension count, dimensions, type, offset),
//! which gives the parameter count when `general.parameter_count` is absent.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The most metadata entries accepted (real models have a few dozen).
const MAX_METADATA_ENTRIES: u64 = 1 << 16;
/// The most tensors accepted (real models have a few thousand).
const MAX_TENSORS: u64 = 1 << 20;
/// The longest key or tensor name accepted (the GGUF specification's own limit is 65535).
const MAX_NAME_BYTES: u64 = 65_535;
/// The longest string value kept (longer ones are skipped unless they are wanted).
const MAX_KEPT_STRING_BYTES: u64 = 1 << 16;
/// The most elements an array may declare (a tokenizer's vocabulary is a few hundred thousand).
const MAX_ARRAY_ELEMENTS: u64 = 1 << 26;
/// The most header bytes read before giving up: the work is bounded even for a file that
/// declares many entries of large arrays.
const MAX_HEADER_BYTES: u64 = 512 << 20;
/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMENSIONS: u32 = 4;
/// The most per-layer values a shape key may list (real models have at most a few hundred layers).
pub(crate) const MAX_LAYERS: u64 = 4096;

pub mod estimate;

/// The shape keys read under the architecture's prefix (`llama.block_count`, ...).
const SHAPE_SUFFIXES: [&str; 8] = [
    "context_length",
    "block_count",
    "embedding_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
];

/// What a GGUF header says about its model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufInfo {
    /// The GGUF version (2 or 3).
    pub version: u32,
    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `general.file_type`: ggml's file-type number (see [`quantization_name`]).
    pub file_type: Option<u32>,
    /// `<architecture>.context_length`: the context the model was trained for.
    pub context_length: Option<u64>,
    /// `general.parameter_count`, else the sum over the tensors' element counts.
    pub parameter_count: Option<u64>,
    /// The architecture's shape, for the KV-cache and compute estimate.
    pub shape: Shape,
    /// Every tensor: where it sits and what its data takes.
    pub tensors: Vec<TensorInfo>,
}

/// The figures under `<architecture>.` that size a model's caches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// `block_count`: the number of layers.
    pub block_count: Option<u64>,
    /// `embedding_length`: the hidden size.
    pub embedding_length: Option<u64>,
    /// `attention.head_count`: query heads (one value for every layer, or one per layer).
    pub head_count: Vec<u64>,
    /// `attention.head_count_kv`: key/value heads (one value, or one per layer); absent means
    /// as many as the query heads (no grouped-query attention).
    pub head_count_kv: Vec<u64>,
    /// `attention.key_length`: a key head's size; absent means embedding / heads.
    pub key_length: Option<u64>,
    /// `attention.value_length`: a value head's size; absent means embedding / heads.
    pub value_length: Option<u64>,
    /// `vocab_size`, else the length of `tokenizer.ggml.tokens`.
    pub vocab_size: Option<u64>,
}

/// One tensor's placement and size, as the estimate needs them (not its name: a hostile header
/// could make names cost up to the header's cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorInfo {
    /// The layer it belongs to (`blk.N.…`), or `None` for the model's other tensors.
    pub layer: Option<u64>,
    /// The input embedding (`token_embd.…`), which llama.cpp keeps in host memory.
    pub input_embedding: bool,
    /// The output head (`output.weight`); a model without one ties it to the input embedding.
    pub output_head: bool,
    /// ggml's type number (see [`estimate::type_size`]).
    pub ggml_type: u32,
    /// The number of elements (the product of its dimensions).
    pub elements: u64,
}

/// A value of a shape key: one number, or one per layer.
enum ShapeValue {
    One(u64),
    PerLayer(Vec<u64>),
}

/// Reads the header of the GGUF file at `path`. Errors name the file and what was wrong.
pub fn read_file(path: &Path) -> Result<GgufInfo, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    read(file).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a GGUF header from the start of `source`.
pub fn read<R: Read + Seek>(mut source: R) -> Result<GgufInfo, String> {
    let length = source.seek(SeekFrom::End(0)).map_err(|e| format!("cannot seek: {e}"))?;
    source.seek(SeekFrom::Start(0)).map_err(|e| format!("cannot seek: {e}"))?;
    let mut reader = Reader { source: BufReader::new(source), read: 0, length };
    let mut magic = [0u8; 4];
    reader.bytes(&mut magic, "the magic")?;
    if &magic != b"GGUF" {
        return Err(format!("not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""));
    }
    let version = reader.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 and 3 are)"));
    }
    let tensors = reader.u64("the tensor count")?;
    if tensors > MAX_TENSORS {
        return Err(format!("the header declares {tensors} tensors; at most {MAX_TENSORS} are accepted"));
    }
    let entries = reader.u64("the metadata count")?;
    if entries > MAX_METADATA_ENTRIES {
        return Err(format!(
            "the header declares {entries} metadata entries; at most {MAX_METADATA_ENTRIES} are accepted"
        ));
    }
    let mut info = GgufInfo { version, ..GgufInfo::default() };
    // The shape keys' prefix is the architecture, which may come after them.
    let mut shape_values: Vec<(String, ShapeValue)> = Vec::new();
    let mut token_count = None;
    for index in 0..entries {
        let key = reader.string(MAX_NAME_BYTES, &format!("metadata entry {index}'s key"))?;
        let kind = reader.u32(&format!("the type of {key}"))?;
        let shape_key = key.split_once('.').is_some_and(|(_, suffix)| SHAPE_SUFFIXES.contains(&suffix));
        match key.as_str() {
            "general.architecture" => info.architecture = Some(reader.wanted_string(kind, &key)?),
            "general.name" => info.name = Some(reader.wanted_string(kind, &key)?),
            "general.file_type" => {
                let value = reader.wanted_integer(kind, &key)?;
                info.file_type = Some(u32::try_from(value).map_err(|_| format!("{key} is {value}, too large"))?);
            }
            "general.parameter_count" => info.parameter_count = Some(reader.wanted_integer(kind, &key)?),
            "tokenizer.ggml.tokens" if kind == TYPE_ARRAY => token_count = Some(reader.skip_array(&key)?),
            _ if shape_key && kind == TYPE_ARRAY => {
                let values = reader.integer_array(&key)?;
                shape_values.push((key, ShapeValue::PerLayer(values)));
            }
            _ if shape_key => {
                let value = reader.wanted_integer(kind, &key)?;
                shape_values.push((key, ShapeValue::One(value)));
            }
            _ => reader.skip_value(kind, &key, true)?,
        }
    }
    if let Some(architecture) = &info.architecture {
        let mut take = |suffix: &str| {
            let wanted = format!("{architecture}.{suffix}");
            shape_values.iter().position(|(key, _)| *key == wanted).map(|at| shape_values.swap_remove(at).1)
        };
        let one = |value: Option<ShapeValue>| match value {
            Some(ShapeValue::One(v)) => Some(v),
            // A per-layer list where one number is expected: its largest, the safe side.
            Some(ShapeValue::PerLayer(values)) => values.into_iter().max(),
            None => None,
        };
        let list = |value: Option<ShapeValue>| match value {
            Some(ShapeValue::One(v)) => vec![v],
            Some(ShapeValue::PerLayer(values)) => values,
            None => Vec::new(),
        };
        info.context_length = one(take("context_length"));
        info.shape = Shape {
            block_count: one(take("block_count")),
            embedding_length: one(take("embedding_length")),
            head_count: list(take("attention.head_count")),
            head_count_kv: list(take("attention.head_count_kv")),
            key_length: one(take("attention.key_length")),
            value_length: one(take("attention.value_length")),
            vocab_size: one(take("vocab_size")).or(token_count),
        };
    }
    info.tensors = reader.tensor_infos(tensors)?;
    if info.parameter_count.is_none() {
        let mut total: u64 = 0;
        for tensor in &info.tensors {
            total =
                total.checked_add(tensor.elements).ok_or_else(|| "the tensors have too many elements".to_string())?;
        }
        info.parameter_count = Some(total);
    }
    Ok(info)
}

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// The size in bytes of a fixed-size value type; `None` for strings, arrays and unknown types.
fn fixed_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A reader that counts what it consumed (its position) against [`MAX_HEADER_BYTES`] and the
/// file's length.
struct Reader<R> {
    source: BufReader<R>,
    read: u64,
    length: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn account(&mut self, bytes: u64, what: &str) -> Result<(), String> {
        self.read = self.read.saturating_add(bytes);
        if self.read > MAX_HEADER_BYTES {
            return Err(format!("the header is longer than {MAX_HEADER_BYTES} bytes (at {what})"));
        }
        Ok(())
    }

    fn bytes(&mut self, buffer: &mut [u8], what: &str) -> Result<(), String> {
        self.account(buffer.len() as u64, what)?;
        self.source.read_exact(buffer).map_err(|e| truncated(what, &e))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let mut buffer = [0u8; 4];
        self.bytes(&mut buffer, what)?;
        Ok(u32::from_le_bytes(buffer))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut buffer = [0u8; 8];
        self.bytes(&mut buffer, what)?;
        Ok(u64::from_le_bytes(buffer))
    }

    /// A string of at most `limit` bytes, as UTF-8.
    fn string(&mut self, limit: u64, what: &str) -> Result<String, String> {
        let length = self.u64(what)?;
        if length > limit {
            return Err(format!("{what} is {length} bytes long; at most {limit} are accepted"));
        }
        self.account(length, what)?;
        let mut text = Vec::new();
        // `take` bounds the read even though the length was checked: nothing is allocated for
        // bytes the file does not have.
        (&mut self.source).take(length).read_to_end(&mut text).map_err(|e| truncated(what, &e))?;
        if text.len() as u64 != length {
            return Err(format!("the file ends inside {what}"));
        }
        String::from_utf8(text).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    /// Moves past `bytes` bytes, checking that the file has them.
    fn skip(&mut self, bytes: u64, what: &str) -> Result<(), String> {
        self.account(bytes, what)?;
        if self.read > self.length {
            return Err(format!("the file ends inside {what}"));
        }
        let offset = i64::try_from(bytes).map_err(|_| format!("{what} is too long"))?;
        // Relative: a tokenizer's many short strings are skipped inside the buffer.
        self.source.seek_relative(offset).map_err(|e| truncated(what, &e))
    }

    fn wanted_string(&mut self, kind: u32, key: &str) -> Result<String, String> {
        if kind != TYPE_STRING {
            return Err(format!("{key} has value type {kind}, not a string"));
        }
        self.string(MAX_KEPT_STRING_BYTES, key)
    }

    /// An unsigned or non-negative integer of any width.
    fn wanted_integer(&mut self, kind: u32, key: &str) -> Result<u64, String> {
        let value: i128 = match (kind, fixed_size(kind)) {
            (0..=5 | 10 | 11, Some(size)) => {
                let mut buffer = [0u8; 8];
                let size = usize::try_from(size).map_err(|_| format!("{key}: bad size"))?;
                let slot = buffer.get_mut(..size).ok_or_else(|| format!("{key}: bad size"))?;
                self.bytes(slot, key)?;
                let unsigned = u64::from_le_bytes(buffer);
                if matches!(kind, 1 | 3 | 5 | 11) {
                    // Sign-extend from the value's own width.
                    let shift = 64 - 8 * size as u32;
                    i128::from(((unsigned << shift) as i64) >> shift)
                } else {
                    i128::from(unsigned)
                }
            }
            _ => return Err(format!("{key} has value type {kind}, not an integer")),
        };
        u64::try_from(value).map_err(|_| format!("{key} is {value}, not a count"))
    }

    /// Moves past a value of type `kind`; arrays of arrays are refused (llama.cpp writes none).
    fn skip_value(&mut self, kind: u32, key: &str, arrays_allowed: bool) -> Result<(), String> {
        if let Some(size) = fixed_size(kind) {
            return self.skip(size, key);
        }
        match kind {
            TYPE_STRING => {
                let length = self.u64(key)?;
                self.skip(length, key)
            }
            TYPE_ARRAY if arrays_allowed => self.skip_array(key).map(|_| ()),
            TYPE_ARRAY => Err(format!("{key} is an array of arrays, which is not supported")),
            other => Err(format!("{key} has unknown value type {other}")),
        }
    }

    /// An array of integers (a per-layer shape value), at most [`MAX_LAYERS`] long.
    fn integer_array(&mut self, key: &str) -> Result<Vec<u64>, String> {
        let element = self.u32(key)?;
        let count = self.u64(key)?;
        if count > MAX_LAYERS {
            return Err(format!("{key} lists {count} values; at most {MAX_LAYERS} are accepted"));
        }
        (0..count).map(|_| self.wanted_integer(element, key)).collect()
    }

    /// Moves past an array whose type was read, returning how many elements it has.
    fn skip_array(&mut self, key: &str) -> Result<u64, String> {
        let element = self.u32(key)?;
        let count = self.u64(key)?;
        if count > MAX_ARRAY_ELEMENTS {
            return Err(format!("{key} declares {count} elements; at most {MAX_ARRAY_ELEMENTS} are accepted"));
        }
        if let Some(size) = fixed_size(element) {
            let bytes = size.checked_mul(count).ok_or_else(|| format!("{key} is too long"))?;
            self.skip(bytes, key)?;
        } else {
            for _ in 0..count {
                self.skip_value(element, key, false)?;
            }
        }
        Ok(count)
    }

    /// The `tensors` tensor infos that follow the metadata.
    fn tensor_infos(&mut self, tensors: u64) -> Result<Vec<TensorInfo>, String> {
        let mut infos = Vec::new();
        for index in 0..tensors {
            let name = self.string(MAX_NAME_BYTES, &format!("tensor {index}'s name"))?;
            let dimensions = self.u32(&format!("tensor {index}'s dimension count"))?;
            if dimensions > MAX_DIMENSIONS {
                return Err(format!(
                    "tensor {index} has {dimensions} dimensions; at most {MAX_DIMENSIONS} are accepted"
                ));
            }
            let mut elements: u64 = 1;
            for _ in 0..dimensions {
                let size = self.u64(&format!("tensor {index}'s dimensions"))?;
                elements = elements.checked_mul(size).ok_or_else(|| format!("tensor {index} has too many elements"))?;
            }
            let ggml_type = self.u32(&format!("tensor {index}'s type"))?;
            self.skip(8, &format!("tensor {index}'s offset"))?;
            let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()).and_then(|n| n.parse().ok());
            let input_embedding = name.starts_with("token_embd.");
            let output_head = name == "output.weight";
            infos.push(TensorInfo { layer, input_embedding, output_head, ggml_type, elements });
        }
        Ok(infos)
    }
}

fn truncated(what: &str, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        format!("the file ends inside {what}")
    } else {
        format!("cannot read {what}: {error}")
    }
}

/// The name Ollama and llama.cpp give a `general.file_type` (llama.cpp's `llama_ftype`), e.g.
/// `Q4_K_M`; `None` for a number this reader does not know.
pub fn quantization_name(file_type: u32) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// A parameter count as Ollama writes it: `8.0B`, `494.03M`, `135K`.
pub fn parameter_size(count: u64) -> String {
    const THOUSAND: f64 = 1e3;
    const MILLION: f64 = 1e6;
    const BILLION: f64 = 1e9;
    // Precision beyond 2^53 does not matter for a display rounded to a tenth.
    let value = count as f64;
    if value >= BILLION {
        let number = value / BILLION;
        if number.fract() == 0.0 { format!("{number:.0}B") } else { format!("{number:.1}B") }
    } else if value >= MILLION {
        let number = value / MILLION;
        if number.fract() == 0.0 { format!("{number:.0}M") } else { format!("{number:.2}M") }
    } else if value >= THOUSAND {
        format!("{:.0}K", value / THOUSAND)
    } else {
        count.to_string()
    }
}

#[cfg(test)]
mod tests;
