//! A small, bounded reader of a GGUF file's header: the few metadata keys `/api/show` and
//! `/api/tags` report (architecture, name, file type, context length, parameter count). It reads
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
    // The context length's key depends on the architecture, which may come after it.
    let mut context_lengths: Vec<(String, u64)> = Vec::new();
    for index in 0..entries {
        let key = reader.string(MAX_NAME_BYTES, &format!("metadata entry {index}'s key"))?;
        let kind = reader.u32(&format!("the type of {key}"))?;
        match key.as_str() {
            "general.architecture" => info.architecture = Some(reader.wanted_string(kind, &key)?),
            "general.name" => info.name = Some(reader.wanted_string(kind, &key)?),
            "general.file_type" => {
                let value = reader.wanted_integer(kind, &key)?;
                info.file_type = Some(u32::try_from(value).map_err(|_| format!("{key} is {value}, too large"))?);
            }
            "general.parameter_count" => info.parameter_count = Some(reader.wanted_integer(kind, &key)?),
            _ if key.ends_with(".context_length") && kind != TYPE_ARRAY => {
                let value = reader.wanted_integer(kind, &key)?;
                context_lengths.push((key, value));
            }
            _ => reader.skip_value(kind, &key, true)?,
        }
    }
    if let Some(architecture) = &info.architecture {
        let wanted = format!("{architecture}.context_length");
        info.context_length = context_lengths.iter().find(|(key, _)| *key == wanted).map(|(_, value)| *value);
    }
    if info.parameter_count.is_none() {
        info.parameter_count = Some(reader.tensor_parameters(tensors)?);
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
            TYPE_ARRAY if arrays_allowed => {
                let element = self.u32(key)?;
                let count = self.u64(key)?;
                if count > MAX_ARRAY_ELEMENTS {
                    return Err(format!("{key} declares {count} elements; at most {MAX_ARRAY_ELEMENTS} are accepted"));
                }
                if let Some(size) = fixed_size(element) {
                    let bytes = size.checked_mul(count).ok_or_else(|| format!("{key} is too long"))?;
                    return self.skip(bytes, key);
                }
                for _ in 0..count {
                    self.skip_value(element, key, false)?;
                }
                Ok(())
            }
            TYPE_ARRAY => Err(format!("{key} is an array of arrays, which is not supported")),
            other => Err(format!("{key} has unknown value type {other}")),
        }
    }

    /// The sum over `tensors` tensor infos of their element counts.
    fn tensor_parameters(&mut self, tensors: u64) -> Result<u64, String> {
        let mut total: u64 = 0;
        for index in 0..tensors {
            let what = format!("tensor {index}'s name");
            let length = self.u64(&what)?;
            if length > MAX_NAME_BYTES {
                return Err(format!("{what} is {length} bytes long; at most {MAX_NAME_BYTES} are accepted"));
            }
            self.skip(length, &what)?;
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
            // The type and the data offset.
            self.skip(12, &format!("tensor {index}'s type and offset"))?;
            total = total.checked_add(elements).ok_or_else(|| "the tensors have too many elements".to_string())?;
        }
        Ok(total)
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
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A GGUF header with these metadata entries (already encoded) and tensors (name, dims).
    fn header(version: u32, entries: &[Vec<u8>], tensors: &[(&str, &[u64])]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((entries.len() as u64).to_le_bytes());
        for entry in entries {
            out.extend(entry);
        }
        for (name, dims) in tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
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
            refusal(header(3, &[entry("general.file_type", TYPE_STRING, &string("x"))], &[]))
                .contains("not an integer")
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
}
