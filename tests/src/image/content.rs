//! File contents: literal bytes or deterministic pseudo-random streams generated from a seed,
//! so that a 60 MB layer needs no 60 MB literal.

use std::io::{self, Read};

/// Size of the blocks the compressible generator mixes (random vs. text).
const BLOCK: usize = 4096;
/// Vocabulary of the text blocks of [`Content::Compressible`].
const WORDS: [&str; 16] = [
    "layer ",
    "chunk ",
    "index ",
    "image ",
    "blob ",
    "digest ",
    "tar ",
    "gzip ",
    "proxy ",
    "registry ",
    "manifest ",
    "seek ",
    "offset ",
    "file\n",
    "store ",
    "agent ",
];

/// The content of a regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// `len` pseudo-random bytes from `seed`: practically incompressible.
    Random {
        /// Seed of the generator; equal seeds give equal streams.
        seed: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes from `seed` mixing random 4 KiB blocks (about one in five) with text
    /// blocks drawn from a small vocabulary; gzip shrinks it about 2-3x.
    Compressible {
        /// Seed of the generator; equal seeds give equal streams.
        seed: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Content {
    /// The content's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Random { len, .. } | Content::Compressible { len, .. } => *len,
        }
    }

    /// Whether the content is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader producing the content.
    pub fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Content::Bytes(b) => Box::new(b.as_slice()),
            Content::Random { seed, len } => Box::new(Generator::new(*seed, *len, false)),
            Content::Compressible { seed, len } => Box::new(Generator::new(*seed, *len, true)),
        }
    }

    /// The whole content in memory (for checks in tests; mind the size).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() as usize);
        // Reading from a slice or the generator cannot fail.
        let _ = self.reader().read_to_end(&mut out);
        out
    }
}

/// SplitMix64: tiny, fast, and good enough for test data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Reader of a generated stream, block by block.
struct Generator {
    rng: SplitMix64,
    remaining: u64,
    compressible: bool,
    block: Vec<u8>,
    pos: usize,
}

impl Generator {
    fn new(seed: u64, len: u64, compressible: bool) -> Self {
        Generator {
            rng: SplitMix64::new(seed),
            remaining: len,
            compressible,
            block: Vec::with_capacity(BLOCK),
            pos: 0,
        }
    }

    fn refill(&mut self) {
        self.block.clear();
        self.pos = 0;
        if !self.compressible || self.rng.next_u64() < u64::MAX / 5 {
            self.block.resize(BLOCK, 0);
            self.rng.fill(&mut self.block);
            return;
        }
        while self.block.len() < BLOCK {
            let r = self.rng.next_u64();
            for i in 0..8 {
                let word = WORDS[((r >> (i * 4)) & 15) as usize];
                self.block.extend_from_slice(word.as_bytes());
            }
        }
        self.block.truncate(BLOCK);
    }
}

impl Read for Generator {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.block.len() {
            self.refill();
        }
        let n = buf
            .len()
            .min(self.block.len() - self.pos)
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        Ok(n)
    }
}
