//! The inputs a fuzz run tries: seeds (real examples of each format) changed a few times
//! each, as libFuzzer's mutators do, by a small seeded generator, so a run is repeatable
//! from its seed alone.

/// splitmix64: small, fast, and good enough to pick mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The longest input tried: parsers see files and outputs of any size, but the paths
/// through them do not change past a few pages.
pub const MAX_INPUT: usize = 64 << 10;

/// Byte values that sit on the edges parsers test.
const EDGE_BYTES: [u8; 12] = [
    0, 1, 0x7f, 0x80, 0xff, b'\n', b'\r', b'"', b'\\', b' ', b'/', b'.',
];
/// Numbers that sit on the edges of fields (sizes, counts, shifts), written over 4 or 8
/// bytes in either byte order.
const EDGE_NUMBERS: [u64; 14] = [
    0,
    1,
    8,
    9,
    21,
    22,
    63,
    64,
    1023,
    1024,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 63,
    u64::MAX,
];
/// Text that sits on the edges of text formats, for every text target.
const EDGE_TEXT: [&[u8]; 14] = [
    b"-1",
    b"18446744073709551616",
    b"1e999",
    b"../",
    b"/",
    b"\0",
    b"\xff\xfe",
    b"'$(touch /tmp/farm-fuzz-pwned)'",
    b"`id`",
    b";",
    b"\"",
    b"{}",
    b"[]",
    b"null",
];

/// A new input from `seeds` (and the target's `dictionary` of tokens): one seed, changed
/// one to eight times; now and then spliced with another, or random bytes outright.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(50) == 0 {
        let len = rng.below(512);
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut data = rng.pick(seeds).clone();
    for _ in 0..1 + rng.below(8) {
        mutate_once(rng, &mut data, seeds, dictionary);
        data.truncate(MAX_INPUT);
    }
    data
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>], dictionary: &[&[u8]]) {
    let at = rng.below(data.len() + 1);
    match rng.below(11) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = rng.next_u64() as u8;
        }
        2 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = *rng.pick(&EDGE_BYTES);
        }
        3 if !dictionary.is_empty() => {
            let token = *rng.pick(dictionary);
            data.splice(at..at, token.iter().copied());
        }
        4 => {
            let token = *rng.pick(&EDGE_TEXT);
            data.splice(at..at, token.iter().copied());
        }
        5 if !data.is_empty() => {
            let end = (at + 1 + rng.below(64)).min(data.len());
            data.drain(at.min(end)..end);
        }
        6 if !data.is_empty() => {
            let start = rng.below(data.len());
            let end = (start + 1 + rng.below(256)).min(data.len());
            let copy = data[start..end].to_vec();
            data.splice(at..at, copy);
        }
        7 => data.truncate(at),
        8 => {
            let other = rng.pick(seeds);
            let from = rng.below(other.len() + 1);
            data.truncate(at);
            data.extend_from_slice(&other[from..]);
        }
        9 if data.len() >= 8 => {
            let n = *rng.pick(&EDGE_NUMBERS);
            let i = rng.below(data.len() - 7) & !3;
            let bytes = match rng.below(4) {
                0 => (n as u32).to_be_bytes().to_vec(),
                1 => (n as u32).to_le_bytes().to_vec(),
                2 => n.to_be_bytes().to_vec(),
                _ => n.to_le_bytes().to_vec(),
            };
            data[i..i + bytes.len()].copy_from_slice(&bytes);
        }
        _ => {
            let len = 1 + rng.below(16);
            let noise: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, noise);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let seeds = vec![b"{\"a\": 1}".to_vec(), b"version = 1\n".to_vec()];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..200)
                .map(|_| mutate(&mut rng, &seeds, &[b"key"]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().all(|input| input.len() <= MAX_INPUT));
    }
}
