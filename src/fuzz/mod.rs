//! Fuzzing of every parser of bytes farm did not write: qcow2 headers, cache records,
//! archive manifests, what a site's observation script printed, QMP and wirefilter answers,
//! consoles read for panics, `cloud-init status`, `farm.lock` and more ([`targets`]).
//!
//! A hypervisor VM's root, a cache's owner or a damaged disk chooses these bytes; for any
//! of them farm must answer or refuse, never panic, hang or allocate without bound. The
//! driver ([`run`]) tries seeded mutations of real examples of each format, catches
//! panics, and times each input; `tests/fuzz.rs` runs it (10,000 inputs per target in CI,
//! any number with `FARM_FUZZ_INPUTS`) and measures allocations too.

mod mutate;
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

pub use mutate::{MAX_INPUT, Rng, mutate};
pub use targets::targets;

/// One parser and what to feed it.
pub struct Target {
    pub name: &'static str,
    /// Real examples of the format, which inputs are made from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens of the format, inserted now and then.
    pub dictionary: &'static [&'static [u8]],
    /// Parses one input; any outcome but a panic is fine.
    pub run: fn(&[u8]),
}

/// What went wrong with one input.
#[derive(Clone, Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    /// The panic's message, or what was too slow or too large.
    pub what: String,
}

/// What a run of one target did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub inputs: u64,
    pub slowest: Duration,
    /// The most bytes one input had allocated at once, when the caller measures it.
    pub peak_bytes: usize,
    /// The first few findings (a run stops collecting after [`MAX_FINDINGS`]).
    pub findings: Vec<Finding>,
}

/// Findings kept per target: the first ones say what is wrong; more only repeat it.
pub const MAX_FINDINGS: usize = 5;

/// How a run judges one input beyond panics.
pub struct Limits<'a> {
    /// An input that takes longer is a finding (a parser's time should not depend on much
    /// more than its input's length, which is at most [`MAX_INPUT`]).
    pub slow: Duration,
    /// An input whose peak allocation is larger is a finding.
    pub peak_bytes: usize,
    /// Resets and reads the peak allocation (the caller's global allocator knows it).
    pub meter: Option<&'a dyn AllocationMeter>,
}

/// Peak allocation since the last reset, as a counting global allocator keeps it.
pub trait AllocationMeter: Sync {
    fn reset(&self);
    fn peak(&self) -> usize;
}

/// Runs `target` on `inputs` inputs made from its seeds with `seed` (its seeds themselves
/// first). The panic hook is silenced meanwhile: a panic is a finding, not noise.
pub fn run(target: &Target, inputs: u64, seed: u64, limits: &Limits) -> Outcome {
    let seeds = (target.seeds)();
    let mut rng = Rng::new(seed ^ fnv(target.name));
    let mut outcome = Outcome::default();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..inputs {
        let input = match seeds.get(i as usize) {
            Some(seed) => seed.clone(),
            None => mutate(&mut rng, &seeds, target.dictionary),
        };
        if let Some(meter) = limits.meter {
            meter.reset();
        }
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let took = started.elapsed();
        let peak = limits.meter.map_or(0, |m| m.peak());
        outcome.inputs += 1;
        outcome.slowest = outcome.slowest.max(took);
        outcome.peak_bytes = outcome.peak_bytes.max(peak);
        let what = match result {
            Err(panic) => Some(format!("panicked: {}", panic_message(&panic))),
            Ok(()) if took > limits.slow => Some(format!("took {took:?}")),
            Ok(()) if peak > limits.peak_bytes => Some(format!("allocated {peak} bytes at once")),
            Ok(()) => None,
        };
        if let Some(what) = what
            && outcome.findings.len() < MAX_FINDINGS
        {
            outcome.findings.push(Finding { input, what });
        }
    }
    std::panic::set_hook(hook);
    outcome
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// A stable number from a target's name, so each target's inputs differ under one seed.
fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<Vec<u8>> {
        vec![b"ok".to_vec()]
    }

    #[test]
    fn a_panicking_parser_is_a_finding_with_its_input_and_message() {
        let target = Target {
            name: "picky",
            seeds,
            dictionary: &[b"boom"],
            run: |input| {
                if input.windows(4).any(|w| w == b"boom") {
                    panic!("found boom");
                }
            },
        };
        let limits = Limits {
            slow: Duration::from_secs(5),
            peak_bytes: usize::MAX,
            meter: None,
        };
        let outcome = run(&target, 2_000, 1, &limits);
        assert_eq!(outcome.inputs, 2_000);
        let finding = outcome
            .findings
            .first()
            .expect("the mutator inserts `boom`");
        assert_eq!(finding.what, "panicked: found boom");
        assert!(finding.input.windows(4).any(|w| w == b"boom"));
    }
}
