//! A GGUF file written as llama.cpp writes one (version 3, little-endian): metadata entries, then
//! tensor infos, then (optionally) zeroed tensor data, so that tests can give vramgate real files
//! to read headers from and, for the prefetch bench, to read whole.

use std::path::Path;

/// GGUF value types used here.
const U32: u32 = 4;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U64: u32 = 10;

/// A GGUF file under construction.
#[derive(Default)]
pub struct Gguf {
    entries: Vec<u8>,
    count: u64,
    /// (name, dimensions, ggml type, data bytes)
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
}

impl Gguf {
    pub fn new() -> Gguf {
        Gguf::default()
    }

    fn key(&mut self, key: &str, kind: u32) {
        self.entries.extend(string(key));
        self.entries.extend(kind.to_le_bytes());
        self.count += 1;
    }

    pub fn text(mut self, key: &str, value: &str) -> Gguf {
        self.key(key, STRING);
        self.entries.extend(string(value));
        self
    }

    pub fn u32(mut self, key: &str, value: u32) -> Gguf {
        self.key(key, U32);
        self.entries.extend(value.to_le_bytes());
        self
    }

    pub fn u64(mut self, key: &str, value: u64) -> Gguf {
        self.key(key, U64);
        self.entries.extend(value.to_le_bytes());
        self
    }

    /// A vocabulary (an array of strings).
    pub fn tokens(mut self, tokens: &[&str]) -> Gguf {
        self.key("tokenizer.ggml.tokens", ARRAY);
        self.entries.extend(STRING.to_le_bytes());
        self.entries.extend((tokens.len() as u64).to_le_bytes());
        for token in tokens {
            self.entries.extend(string(token));
        }
        self
    }

    /// A tensor of ggml type `ggml_type` whose data takes `data_bytes` (written as zeros by
    /// [`Gguf::write_with_data`]).
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data_bytes: u64) -> Gguf {
        self.tensors.push((name.to_string(), dims.to_vec(), ggml_type, data_bytes));
        self
    }

    /// The header alone: metadata and tensor infos, no tensor data.
    pub fn header(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.count.to_le_bytes());
        out.extend(&self.entries);
        let mut offset = 0u64;
        for (name, dims, ggml_type, bytes) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for dim in dims {
                out.extend(dim.to_le_bytes());
            }
            out.extend(ggml_type.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += bytes.div_ceil(32) * 32;
        }
        out
    }

    /// Writes the header alone (what vramgate reads).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.header()).expect("write the GGUF file");
    }

    /// Writes the header, the alignment padding and every tensor's data (zeros), as a whole
    /// model file of the declared size.
    pub fn write_with_data(&self, path: &Path) {
        use std::io::Write;
        let mut header = self.header();
        header.resize(header.len().div_ceil(32) * 32, 0);
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create the GGUF file"));
        file.write_all(&header).expect("write the header");
        let zeros = vec![0u8; 1 << 20];
        for (_, _, _, bytes) in &self.tensors {
            let mut left = bytes.div_ceil(32) * 32;
            while left > 0 {
                let chunk = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..chunk]).expect("write tensor data");
                left -= chunk as u64;
            }
        }
        file.flush().expect("flush the GGUF file");
    }
}

/// A GGUF string: its length as a u64, then its bytes.
pub fn string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out
}
