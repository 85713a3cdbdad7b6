//! The demo workloads. Each folds what it computed, and every input it
//! consumed, into the running [`Digest`].

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;

use ftvm_guest_rt::{entropy as platform_entropy, nop, now_ns, println, wait_until};

/// Order-sensitive 64-bit accumulator. Each step is a bijection of the state
/// for a fixed input and of the input for a fixed state, so changing any one
/// folded value (with the rest of the run unchanged) changes the result.
pub struct Digest(u64);

impl Digest {
    pub fn new() -> Self {
        Digest(0x6a09_e667_f3bc_c908)
    }

    pub fn fold(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(23) ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    pub fn fold_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.fold(u64::from(b));
        }
    }

    /// SplitMix64 finaliser, so similar runs give unrelated-looking results.
    pub fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Deterministic pseudo-random numbers for workload data (not an input).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

// ---------------------------------------------------------------- compute

/// Integer and floating-point work, no exits apart from one console line.
pub fn compute(digest: &mut Digest, scale: usize) {
    let hash = hash_buffer(4 * 1024 * 1024 * scale);
    let (prime_count, prime_sum) = primes(2_000_000 * scale);
    let (mandel_iters, mandel_sum) = kernels::mandelbrot(160, 120, 256 * scale as u32);
    let roots = kernels::sum_of_roots(20_000 * scale);
    digest.fold(hash);
    digest.fold(prime_count as u64);
    digest.fold(prime_sum);
    digest.fold(mandel_iters);
    digest.fold(mandel_sum.to_bits());
    digest.fold(roots.to_bits() as u64);
    println!(
        "compute: fnv={hash:016x} primes={prime_count} mandel={mandel_iters} roots={roots:.3}"
    );
}

/// FNV-1a over `len` bytes of generated data.
fn hash_buffer(len: usize) -> u64 {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sieve of Eratosthenes: how many primes below `limit`, and their sum.
fn primes(limit: usize) -> (usize, u64) {
    let mut composite = vec![false; limit];
    let mut count = 0;
    let mut sum = 0u64;
    for n in 2..limit {
        if !composite[n] {
            count += 1;
            sum += n as u64;
            let mut multiple = n * n;
            while multiple < limit {
                composite[multiple] = true;
                multiple += n;
            }
        }
    }
    (count, sum)
}

// ---------------------------------------------------------------- heap

/// Allocator churn: a BTreeMap of byte vectors with inserts and removals,
/// large sorts, many strings.
pub fn heap(digest: &mut Digest, scale: usize) {
    check_memory_builtins();
    let mut rng = XorShift(0x0bad_cafe_f00d_1234);
    let mut map: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for round in 0..4 * scale {
        for _ in 0..3000 {
            let key = rng.below(10_000);
            let len = rng.below(300) as usize;
            map.insert(key, vec![(key as u8) ^ (round as u8); len]);
        }
        let doomed: Vec<u64> = map
            .keys()
            .copied()
            .filter(|k| k % 3 == round as u64 % 3)
            .collect();
        for key in doomed {
            map.remove(&key);
        }
    }
    let mut map_hash = 0u64;
    for (key, value) in &map {
        map_hash = map_hash.rotate_left(7) ^ key ^ ((value.len() as u64) << 32);
    }

    let mut numbers: Vec<u64> = (0..200_000 * scale).map(|_| rng.next()).collect();
    numbers.sort_unstable();
    let sorted_ok = numbers.windows(2).all(|w| w[0] <= w[1]);
    let median = numbers[numbers.len() / 2];

    let mut words: Vec<String> = (0..20_000 * scale)
        .map(|i| format!("w{:x}-{}", rng.next() & 0xffff_ffff, i % 97))
        .collect();
    words.sort();
    words.dedup();
    let words_hash = words.iter().fold(0u64, |h, w| {
        h.rotate_left(5) ^ w.len() as u64 ^ u64::from(w.as_bytes()[1])
    });

    // Boxes of mixed sizes, freed in random order.
    let mut boxes: Vec<Option<Vec<u32>>> = (0..4000 * scale)
        .map(|i| Some(vec![i as u32; 1 + (i * 37) % 200]))
        .collect();
    let mut freed = 0;
    for _ in 0..boxes.len() {
        let slot = rng.below(boxes.len() as u64) as usize;
        if boxes[slot].take().is_some() {
            freed += 1;
        }
    }
    drop(boxes);

    digest.fold(map.len() as u64);
    digest.fold(map_hash);
    digest.fold(median);
    digest.fold(u64::from(sorted_ok));
    digest.fold(words.len() as u64);
    digest.fold(words_hash);
    digest.fold(freed);
    println!(
        "heap: map={} median={median:016x} sorted={sorted_ok} words={} freed={freed}",
        map.len(),
        words.len()
    );
}

/// Checks the runtime's memory builtins against plain loops (overlapping
/// moves both ways, compares with the difference at each position).
pub fn check_memory_builtins() {
    extern "C" {
        fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32;
        fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32;
    }
    let base: Vec<u8> = (0..64u8).collect();
    for len in [0usize, 1, 2, 7, 31] {
        for shift in [1usize, 3, 16] {
            let mut up = base.clone();
            up.copy_within(0..len, shift);
            let mut down = base.clone();
            down.copy_within(shift..shift + len, 0);
            for i in 0..len {
                assert_eq!(up[shift + i], base[i], "memmove up len={len} shift={shift}");
                assert_eq!(
                    down[i],
                    base[shift + i],
                    "memmove down len={len} shift={shift}"
                );
            }
        }
    }
    for len in [1usize, 2, 9, 40] {
        for at in 0..len {
            let a = base[..len].to_vec();
            let mut b = a.clone();
            b[at] = b[at].wrapping_add(5);
            // SAFETY: both buffers are `len` bytes long.
            let (lt, gt, eq, ne) = unsafe {
                (
                    memcmp(a.as_ptr(), b.as_ptr(), len),
                    memcmp(b.as_ptr(), a.as_ptr(), len),
                    memcmp(a.as_ptr(), a.clone().as_ptr(), len),
                    bcmp(a.as_ptr(), b.as_ptr(), len),
                )
            };
            assert!(
                lt < 0 && gt > 0 && eq == 0 && ne != 0,
                "memcmp len={len} at={at}"
            );
        }
    }
    // SAFETY: zero-length compares read nothing.
    assert_eq!(unsafe { memcmp(base.as_ptr(), base[1..].as_ptr(), 0) }, 0);
}

// ---------------------------------------------------------------- clock

/// `waits` short platform waits (20-60 us deadlines), folding every clock
/// value read and every wait outcome; checks the clock is monotonic.
pub fn clock(digest: &mut Digest, waits: u32) {
    let first = now_ns();
    let mut previous = first;
    let mut backwards = 0u32;
    let mut early = 0u32;
    let mut inputs = 0u32;
    for i in 0..waits {
        let before = now_ns();
        digest.fold(before);
        // Reading the page costs no exit: the value only changes at exits.
        let mut spins = 0u64;
        while now_ns() == before && spins < 100 {
            spins += 1;
        }
        digest.fold(spins);
        let deadline = before + 20_000 + u64::from(i % 5) * 10_000;
        let input = wait_until(deadline);
        let after = now_ns();
        digest.fold(after);
        digest.fold(u64::from(input));
        if after < previous || after < before {
            backwards += 1;
        }
        if !input && after < deadline {
            early += 1;
        }
        if input {
            inputs += 1;
        }
        previous = after;
    }
    println!(
        "clock: {waits} waits over {} us, backwards={backwards} early={early} input_wakes={inputs}",
        previous.saturating_sub(first) / 1000
    );
}

// ---------------------------------------------------------------- entropy

/// Requests random bytes in assorted sizes (one over 4 KiB, so two requests)
/// and folds every byte.
pub fn entropy(digest: &mut Digest, rounds: u32) {
    const SIZES: [usize; 8] = [1, 7, 16, 64, 255, 1024, 4096, 5000];
    let mut buf = vec![0u8; 5000];
    let mut total = 0usize;
    let mut ones = 0u64;
    for _ in 0..rounds {
        for &size in &SIZES {
            let chunk = &mut buf[..size];
            platform_entropy(chunk);
            digest.fold_bytes(chunk);
            ones += chunk.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
            total += size;
        }
    }
    // About half the bits should be set; far off means the VMM sent zeros.
    let permille = ones * 1000 / (total as u64 * 8);
    println!("entropy: {total} bytes, {permille} permille ones");
    if !(400..=600).contains(&permille) {
        println!("entropy: WARNING: the bytes do not look random");
    }
}

// ---------------------------------------------------------------- mixed

/// All of the above, interleaved: a few hundred exits per iteration.
pub fn mixed(digest: &mut Digest, iterations: u64) {
    for iteration in 0..iterations {
        println!("mixed: iteration {iteration} at {} ns", now_ns());
        digest.fold(now_ns());
        entropy(digest, 1);
        clock(digest, 60);
        compute(digest, 1);
        clock(digest, 60);
        heap(digest, 1);
        entropy(digest, 2);
        clock(digest, 80);
    }
}

// ---------------------------------------------------------------- benchmark

/// `count` NOP requests: nothing but exits. Folds every clock value.
pub fn exits(digest: &mut Digest, count: u32) {
    let first = now_ns();
    for _ in 0..count {
        nop();
        digest.fold(now_ns());
    }
    println!(
        "exits: {count} NOPs in {} us",
        now_ns().saturating_sub(first) / 1000
    );
}

/// Like `mixed` without the waits, so its time is the guest's work and the
/// exits, never sleeping until a deadline: entropy, NOP bursts, compute and
/// heap churn, about 2,000 exits per iteration.
pub fn busy(digest: &mut Digest, iterations: u64) {
    for iteration in 0..iterations {
        println!("busy: iteration {iteration} at {} ns", now_ns());
        digest.fold(now_ns());
        entropy(digest, 1);
        exits(digest, 600);
        compute(digest, 1);
        exits(digest, 600);
        heap(digest, 1);
        entropy(digest, 2);
        exits(digest, 800);
    }
}

/// The shared compute kernel (`guest/kernels`), run once untimed (so its
/// scratch memory is touched) and then `runs` times, each timed with the
/// platform clock (a NOP right before and after refreshes it; the interval
/// includes about one exit). Prints `kernel: run=<i> kernel_ns=<n>
/// checksum=<x>` per timed run; the bench compares with a native run.
pub fn kernel(digest: &mut Digest, runs: u64) {
    let mut scratch = vec![0u8; kernels::SCRATCH_LEN];
    let warm = kernels::run(&mut scratch);
    digest.fold(warm);
    for run in 0..runs {
        nop();
        let start = now_ns();
        let checksum = kernels::run(&mut scratch);
        nop();
        let elapsed = now_ns().saturating_sub(start);
        digest.fold(checksum);
        digest.fold(elapsed);
        if checksum != warm {
            println!("kernel: WARNING: checksum {checksum:016x} differs from warm-up {warm:016x}");
        }
        println!("kernel: run={run} kernel_ns={elapsed} checksum={checksum:016x}");
    }
}

// ---------------------------------------------------------------- faults

/// Ends the machine abnormally in the way `workload` names.
pub fn fault(workload: &str) -> ! {
    println!("demo: {workload}: about to fail on purpose");
    ftvm_guest_rt::console::flush();
    match workload {
        // SAFETY: raises #UD on purpose; the VMM ends the machine.
        "fault-ud" => unsafe { asm!("ud2", options(noreturn, nomem, nostack)) },
        "fault-pf" => {
            // Canonical but above the 4 GiB identity map: not mapped, so #PF.
            // (0xdead_0000_0000 has bit 47 set without sign extension: it is
            // non-canonical and raises #GP, not #PF.)
            let address = 0x00de_ad00_0000usize as *const u64;
            // SAFETY: deliberately faults; the machine ends before the read completes.
            let value = unsafe { core::ptr::read_volatile(address) };
            panic!("read of unmapped {address:p} returned {value:#x}")
        }
        // `hlt` is privileged: #GP(0) at CPL3.
        // SAFETY: raises #GP on purpose.
        "fault-gp" => unsafe { asm!("hlt", options(noreturn, nomem, nostack)) },
        // SAFETY: divides by zero on purpose: #DE. (Rust's `/` would panic instead.)
        "fault-de" => unsafe {
            asm!("xor ecx, ecx", "xor edx, edx", "mov eax, 1", "div ecx",
                 out("eax") _, out("ecx") _, out("edx") _, options(nomem, nostack));
            panic!("division by zero did not fault")
        },
        _ => panic!("demo panic requested by the command line (workload={workload})"),
    }
}
