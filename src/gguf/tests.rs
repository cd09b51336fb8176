//! The header reader's tests, on headers written here byte by byte.

use std::io::Cursor;

use super::estimate::{self, CacheType, Launch};
use super::*;

/// A GGUF header with these metadata entries (already encoded) and tensors (name, dims), all F32.
fn header(version: u32, entries: &[Vec<u8>], tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let typed: Vec<(&str, &[u64], u32)> = tensors.iter().map(|(name, dims)| (*name, *dims, 0)).collect();
    typed_header(version, entries, &typed)
}

/// A GGUF header with tensors of the given ggml types (name, dims, type).
fn typed_header(version: u32, entries: &[Vec<u8>], tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((entries.len() as u64).to_le_bytes());
    for entry in entries {
        out.extend(entry);
    }
    for (name, dims, ggml_type) in tensors {
        out.extend(string(name));
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ggml_type.to_le_bytes());
        out.extend(0u64.to_le_bytes());
    }
    out
}

fn string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out
}

fn entry(key: &str, kind: u32, value: &[u8]) -> Vec<u8> {
    let mut out = string(key);
    out.extend(kind.to_le_bytes());
    out.extend(value);
    out
}

fn parse(bytes: Vec<u8>) -> Result<GgufInfo, String> {
    read(Cursor::new(bytes))
}

fn llama() -> Vec<Vec<u8>> {
    let mut tokens = 2u32.to_le_bytes().to_vec(); // element type: u16
    tokens.extend(3u64.to_le_bytes());
    tokens.extend([1, 0, 2, 0, 3, 0]);
    let mut vocab = TYPE_STRING.to_le_bytes().to_vec();
    vocab.extend(2u64.to_le_bytes());
    vocab.extend(string("<s>"));
    vocab.extend(string("</s>"));
    vec![
        entry("general.architecture", TYPE_STRING, &string("llama")),
        entry("general.name", TYPE_STRING, &string("tiny")),
        entry("tokenizer.ggml.token_type", TYPE_ARRAY, &tokens),
        entry("tokenizer.ggml.tokens", TYPE_ARRAY, &vocab),
        entry("general.file_type", 4, &15u32.to_le_bytes()),
        entry("llama.context_length", 4, &4096u32.to_le_bytes()),
        entry("qwen2.context_length", 10, &9u64.to_le_bytes()),
        entry("llama.rope.freq_base", 6, &1.0f32.to_le_bytes()),
    ]
}

#[test]
fn reads_the_wanted_keys_and_counts_parameters_from_tensors() {
    let info = parse(header(3, &llama(), &[("a", &[64, 32]), ("b", &[10])])).expect("valid header");
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.name.as_deref(), Some("tiny"));
    assert_eq!(info.file_type, Some(15));
    assert_eq!(info.context_length, Some(4096));
    assert_eq!(info.parameter_count, Some(64 * 32 + 10));
}

#[test]
fn a_declared_parameter_count_wins() {
    let mut entries = llama();
    entries.push(entry("general.parameter_count", 10, &7_000_000_000u64.to_le_bytes()));
    let info = parse(header(2, &entries, &[("a", &[3])])).expect("valid header");
    assert_eq!(info.parameter_count, Some(7_000_000_000));
}

#[test]
fn refuses_malformed_headers_with_a_reason() {
    let refusal = |bytes: Vec<u8>| parse(bytes).expect_err("must be refused");
    assert!(refusal(b"GGML\x03\0\0\0".to_vec()).contains("not a GGUF file"));
    assert!(refusal(b"GG".to_vec()).contains("ends inside the magic"));
    assert!(refusal(header(1, &[], &[])).contains("version 1 is not supported"));
    assert!(refusal(header(4, &[], &[])).contains("version 4"));
    // Truncated anywhere: inside an entry, inside a tensor.
    let whole = header(3, &llama(), &[("a", &[64, 32])]);
    for cut in [20, 30, 60, whole.len() - 1] {
        let error = refusal(whole[..cut].to_vec());
        assert!(error.contains("ends inside"), "cut at {cut}: {error}");
    }
    // Counts and lengths past their caps.
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(0u64.to_le_bytes());
    huge.extend(u64::MAX.to_le_bytes());
    assert!(refusal(huge).contains("metadata entries"));
    let mut tensors = b"GGUF".to_vec();
    tensors.extend(3u32.to_le_bytes());
    tensors.extend(u64::MAX.to_le_bytes());
    assert!(refusal(tensors).contains("tensors"));
    let long_key = {
        let mut key = u64::MAX.to_le_bytes().to_vec();
        key.extend(b"x");
        key
    };
    assert!(refusal(header(3, &[long_key], &[])).contains("at most"));
    let mut array = 0u32.to_le_bytes().to_vec();
    array.extend(u64::MAX.to_le_bytes());
    assert!(refusal(header(3, &[entry("big", TYPE_ARRAY, &array)], &[])).contains("elements"));
    let mut nested = TYPE_ARRAY.to_le_bytes().to_vec();
    nested.extend(1u64.to_le_bytes());
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    assert!(refusal(header(3, &[entry("nested", TYPE_ARRAY, &nested)], &[])).contains("array of arrays"));
    // Wrong types for the wanted keys, unknown types, bad UTF-8, a negative count.
    assert!(refusal(header(3, &[entry("general.architecture", 4, &[0; 4])], &[])).contains("not a string"));
    assert!(
        refusal(header(3, &[entry("general.file_type", TYPE_STRING, &string("x"))], &[])).contains("not an integer")
    );
    assert!(refusal(header(3, &[entry("other", 99, &[])], &[])).contains("unknown value type 99"));
    let mut bad_utf8 = 1u64.to_le_bytes().to_vec();
    bad_utf8.push(0xff);
    assert!(refusal(header(3, &[entry("general.name", TYPE_STRING, &bad_utf8)], &[])).contains("UTF-8"));
    assert!(refusal(header(3, &[entry("llama.context_length", 5, &(-1i32).to_le_bytes())], &[])).contains("-1"));
    // A tensor with too many dimensions or an element count that overflows.
    assert!(refusal(header(3, &[], &[("t", &[1, 1, 1, 1, 1])])).contains("dimensions"));
    assert!(refusal(header(3, &[], &[("t", &[u64::MAX, 2])])).contains("too many elements"));
}

#[test]
fn names_quantizations_and_sizes_as_ollama_does() {
    assert_eq!(quantization_name(15), Some("Q4_K_M"));
    assert_eq!(quantization_name(2), Some("Q4_0"));
    assert_eq!(quantization_name(1000), None);
    assert_eq!(parameter_size(8_000_000_000), "8B");
    assert_eq!(parameter_size(8_030_261_248), "8.0B");
    assert_eq!(parameter_size(494_032_768), "494.03M");
    assert_eq!(parameter_size(135_000), "135K");
    assert_eq!(parameter_size(42), "42");
}

fn u32_entry(key: &str, value: u32) -> Vec<u8> {
    entry(key, 4, &value.to_le_bytes())
}

/// A two-layer llama with grouped-query attention (4 query heads, 2 KV heads of 16), a 1000-token
/// vocabulary and a 1024-token trained context; tensors of several quantized types.
fn tiny_llama() -> Vec<u8> {
    let entries = vec![
        entry("general.architecture", TYPE_STRING, &string("llama")),
        u32_entry("llama.block_count", 2),
        u32_entry("llama.context_length", 1024),
        u32_entry("llama.embedding_length", 64),
        u32_entry("llama.attention.head_count", 4),
        u32_entry("llama.attention.head_count_kv", 2),
        u32_entry("llama.vocab_size", 1000),
    ];
    typed_header(
        3,
        &entries,
        &[
            ("token_embd.weight", &[64, 1000], 12),  // Q4_K, in host memory
            ("blk.0.attn_q.weight", &[64, 64], 8),   // Q8_0: 128 blocks of 34 bytes
            ("blk.0.ffn_up.weight", &[64, 256], 12), // Q4_K: 64 blocks of 144 bytes
            ("blk.1.attn_q.weight", &[64, 64], 8),   // 4352 bytes
            ("blk.1.ffn_up.weight", &[64, 256], 12), // 9216 bytes
            ("output.weight", &[64, 1000], 14),      // Q6_K: 250 blocks of 210 bytes
            ("output_norm.weight", &[64], 0),        // F32: 256 bytes
        ],
    )
}

#[test]
fn reads_the_shape_and_the_tensors_types() {
    let info = parse(tiny_llama()).expect("valid header");
    assert_eq!(info.shape.block_count, Some(2));
    assert_eq!(info.shape.embedding_length, Some(64));
    assert_eq!(info.shape.head_count, vec![4]);
    assert_eq!(info.shape.head_count_kv, vec![2]);
    assert_eq!(info.shape.vocab_size, Some(1000));
    assert_eq!(info.context_length, Some(1024));
    assert_eq!(info.tensors.len(), 7);
    assert!(info.tensors[0].input_embedding);
    assert_eq!(info.tensors[3].layer, Some(1));
    assert_eq!(info.tensors[5].layer, None);
    assert_eq!(info.tensors[5].ggml_type, 14);
    // The vocabulary from the tokenizer when the architecture does not say it.
    let info = parse(header(3, &llama(), &[])).expect("valid header");
    assert_eq!(info.shape.vocab_size, Some(2));
}

/// The hand computation, term by term, for `-c 2048` (docs/configuration.md, "Estimates").
#[test]
fn the_estimate_matches_a_hand_computation() {
    let info = parse(tiny_llama()).expect("valid header");
    let launch = estimate::launch_from_args(&["llama-server", "-m", "m.gguf", "-c", "2048"]).expect("flags");
    let e = estimate::estimate(&info, &launch).expect("an estimate");
    // Layers 0 and 1 (4352 + 9216 each), the output (52500) and its norm (256); not token_embd.
    assert_eq!(e.weights_bytes, 2 * (4352 + 9216) + 52_500 + 256);
    // Per token and layer: 2 KV heads × 16 (64 / 4 heads) × 2 bytes, for K and V: 128 bytes.
    assert_eq!(e.kv_bytes_per_token, 2 * 128);
    assert_eq!(e.kv_cache_bytes, 2048 * 256);
    // 512 × 4 × (1000 + 4 × 64).
    assert_eq!(e.compute_bytes, 512 * 4 * (1000 + 256));
    assert_eq!(e.overhead_bytes, 256 << 20);
    // 79 892 + 524 288 + 2 572 288 + 268 435 456 = 271 611 924 bytes = 259.03 MiB, rounded up.
    assert_eq!(e.total_mib(), 260);
    // Without -c: the trained context (1024).
    let e = estimate::estimate(&info, &Launch::default()).expect("an estimate");
    assert_eq!((e.context, e.kv_cache_bytes), (1024, 1024 * 256));
    // One layer offloaded: layer 0's tensors only, and its KV cache.
    let launch = estimate::launch_from_args(&["llama-server", "-ngl", "1"]).expect("flags");
    let e = estimate::estimate(&info, &launch).expect("an estimate");
    assert_eq!((e.weights_bytes, e.kv_bytes_per_token), (4352 + 9216, 128));
    // Nothing offloaded: nothing on the GPU at all.
    let launch = estimate::launch_from_args(&["llama-server", "--n-gpu-layers=0"]).expect("flags");
    assert_eq!(estimate::estimate(&info, &launch).expect("an estimate").total_mib(), 0);
}

/// Another architecture's key layout: explicit key and value lengths, a per-layer KV head list
/// with a layer that keeps no cache, a quantized cache type.
#[test]
fn per_layer_heads_explicit_lengths_and_quantized_caches() {
    let mut kv_heads = 4u32.to_le_bytes().to_vec(); // element type: u32
    kv_heads.extend(2u64.to_le_bytes());
    kv_heads.extend(2u32.to_le_bytes());
    kv_heads.extend(0u32.to_le_bytes());
    let entries = vec![
        u32_entry("qwen2.block_count", 2),
        u32_entry("qwen2.embedding_length", 128),
        u32_entry("qwen2.attention.head_count", 4),
        entry("qwen2.attention.head_count_kv", TYPE_ARRAY, &kv_heads),
        u32_entry("qwen2.attention.key_length", 64),
        u32_entry("qwen2.attention.value_length", 32),
        u32_entry("qwen2.vocab_size", 500),
        // The architecture after its keys, as a writer may order them.
        entry("general.architecture", TYPE_STRING, &string("qwen2")),
    ];
    let info = parse(typed_header(3, &entries, &[("blk.0.attn_k.weight", &[128, 128], 30)])).expect("valid");
    assert_eq!(info.shape.head_count_kv, vec![2, 0]);
    let launch =
        estimate::launch_from_args(&["srv", "-c", "512", "-ctk", "q8_0", "--cache-type-v=q4_0"]).expect("flags");
    assert_eq!((launch.cache_type_k, launch.cache_type_v), (CacheType::Q8_0, CacheType::Q4_0));
    let e = estimate::estimate(&info, &launch).expect("an estimate");
    // Layer 0: K 2 × 64 = 128 elements in q8_0 (4 blocks of 34), V 2 × 32 = 64 in q4_0 (2 of 18).
    assert_eq!(e.kv_bytes_per_token, 4 * 34 + 2 * 18);
    // BF16 weights: 2 bytes each.
    assert_eq!(e.weights_bytes, 128 * 128 * 2);
}

#[test]
fn the_context_that_fits_comes_from_the_kv_cost_per_token() {
    let info = parse(tiny_llama()).expect("valid header");
    let e = estimate::estimate(&info, &Launch::default()).expect("an estimate");
    let fixed = e.weights_bytes + e.compute_bytes + e.overhead_bytes;
    // 300 MiB leaves 300 MiB − fixed for 256-byte tokens, rounded down to a multiple of 256.
    let expected = ((300u64 << 20) - fixed) / 256 / 256 * 256;
    assert_eq!(e.context_fitting(300), Some(expected));
    assert_eq!(e.context_fitting(100), None, "the fixed terms alone do not fit");
}

#[test]
fn estimates_refuse_what_they_cannot_know() {
    // An unknown tensor type is named, never guessed.
    let mut entries = vec![entry("general.architecture", TYPE_STRING, &string("llama"))];
    entries.push(u32_entry("llama.block_count", 1));
    let info = parse(typed_header(3, &entries, &[("blk.0.x", &[32], 77)])).expect("valid header");
    let error = estimate::estimate(&info, &Launch::default()).expect_err("unknown type");
    assert!(error.contains("tensor type 77"), "{error}");
    // Missing shape figures are named.
    let info = parse(header(3, &llama(), &[])).expect("valid header");
    let error = estimate::estimate(&info, &Launch::default()).expect_err("no block_count");
    assert!(error.contains("block_count"), "{error}");
    // A per-layer list past the cap is refused while reading, before anything is allocated.
    let mut huge = 4u32.to_le_bytes().to_vec();
    huge.extend(u64::MAX.to_le_bytes());
    let error = parse(header(3, &[entry("llama.attention.head_count_kv", TYPE_ARRAY, &huge)], &[])).expect_err("cap");
    assert!(error.contains("at most 4096"), "{error}");
    // Flags: a bad number, an unknown cache type, a flag without its value.
    for (args, needle) in [
        (&["srv", "-c", "lots"][..], "-c lots"),
        (&["srv", "-ctk", "q9"][..], "-ctk q9"),
        (&["srv", "--ctx-size"][..], "--ctx-size has no value"),
    ] {
        let error = estimate::launch_from_args(args).expect_err("refused");
        assert!(error.contains(needle), "{args:?}: {error}");
    }
    let all = estimate::launch_from_args(&["srv", "-ngl", "all", "-ub", "128"]).expect("flags");
    assert_eq!((all.gpu_layers, all.ubatch), (None, Some(128)));
}

/// A hostile layer count is refused at once (it bounds a loop), and a model without an output
/// head counts the copy of its input embedding llama.cpp puts on the GPU; other model files the
/// server loads count at their size.
#[test]
fn layer_counts_are_bounded_tied_embeddings_and_extra_files_count() {
    let mut entries = vec![entry("general.architecture", TYPE_STRING, &string("llama"))];
    entries.push(entry("llama.block_count", 10, &(1u64 << 40).to_le_bytes()));
    let info = parse(header(3, &entries, &[])).expect("valid header");
    let started = std::time::Instant::now();
    let error = estimate::estimate(&info, &Launch::default()).expect_err("too many layers");
    assert!(error.contains("at most 4096"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "refused without looping");
    // tiny_llama without its output head: token_embd (Q4_K, 250 blocks of 144) is counted instead.
    let tied = parse(tiny_llama()).map(|mut info| {
        info.tensors.retain(|t| !t.output_head);
        info
    });
    let e = estimate::estimate(&tied.expect("valid header"), &Launch::default()).expect("an estimate");
    assert_eq!(e.weights_bytes, 2 * (4352 + 9216) + 256 + 250 * 144);
    let launch = Launch { extra_bytes: 1 << 20, ..Launch::default() };
    let with_projector = estimate::estimate(&parse(tiny_llama()).expect("valid"), &launch).expect("an estimate");
    assert_eq!(with_projector.weights_bytes, 2 * (4352 + 9216) + 52_500 + 256 + (1 << 20));
}
