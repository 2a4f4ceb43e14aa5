//! The simulator's one source of randomness: splitmix64, seeded by the run's
//! seed. Nothing else in a run may be random, so a seed replays exactly.
//!
//! Under the fuzzer (`Rng::from_bytes`) the choices are read from the fuzz
//! input instead, one choice at a time from its front: a choice among at
//! most 256 takes one byte, among at most 65,536 two (little-endian), any
//! other eight; the value is that number modulo the count. Once the bytes
//! run out, the choices come from a splitmix64 stream of a fixed seed, so a
//! run is a function of its input alone.

pub struct Rng {
    state: u64,
    /// Fuzz input and how much of it is read; `None` for a seeded run.
    input: Option<(Vec<u8>, usize)>,
}

/// The seed of the stream an input's choices continue with once it is read.
const INPUT_FALLBACK_SEED: u64 = 0x0f0f_f0f0;

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x005e_ed0f_7275_7969,
            input: None,
        }
    }

    /// Choices read from `data` (see the module's documentation).
    pub fn from_bytes(data: &[u8]) -> Rng {
        Rng {
            input: Some((data.to_vec(), 0)),
            ..Rng::new(INPUT_FALLBACK_SEED)
        }
    }

    /// Whether this reads from an input that is read to its end (never for
    /// a seeded run).
    pub fn exhausted(&self) -> bool {
        self.input
            .as_ref()
            .is_some_and(|(data, read)| *read >= data.len())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next `width` bytes of the input as a little-endian number, if
    /// any are left (a short read at the end is padded with zeros).
    fn read_input(&mut self, width: usize) -> Option<u64> {
        let (data, read) = self.input.as_mut()?;
        if *read >= data.len() {
            return None;
        }
        let end = (*read + width).min(data.len());
        let mut bytes = [0u8; 8];
        bytes[..end - *read].copy_from_slice(&data[*read..end]);
        *read = end;
        Some(u64::from_le_bytes(bytes))
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if self.input.is_some() {
            let width = match n {
                0..=256 => 1,
                257..=65_536 => 2,
                _ => 8,
            };
            if let Some(value) = self.read_input(width) {
                return value % n;
            }
        }
        self.next_u64() % n
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
}
