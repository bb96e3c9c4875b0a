//! The compute threads that run every `llama_decode` of the process.
//!
//! llama.cpp's CPU backend runs each graph on an OpenMP team: the thread that calls `llama_decode` and
//! `n_threads - 1` workers, which meet at a barrier after every operation (hundreds per token). libgomp
//! gives every thread that ever started a parallel region a team of its own, kept until that thread exits,
//! and as soon as the process holds more OpenMP threads than cores it stops spinning at barriers and sleeps
//! at each one. So a second thread that decodes (a Python thread, a server's worker, the pool's decoder)
//! made every decode of the process about 1.6 times slower on two cores, even with the first one idle
//! (measured: 64 tokens in 0.55 s from the main thread, 0.85 s from another thread after the main thread
//! had decoded; docs/engine.md). Building llama.cpp without OpenMP instead makes its barriers spin, and
//! contexts decoding at once then spin out each other's time slices: 8 chats with a context each made 2.7
//! tokens/s together on two cores.
//!
//! So every decode runs on a compute thread, one of a few long-lived ones: the decodes of contexts with
//! `n_threads` threads share `max(1, cores / n_threads)` lanes (one lane by default, where a context has as
//! many threads as the machine has cores), taken in the order the decodes arrive (rayon's queue for jobs from
//! outside its pool is first in, first out). The process then holds no more OpenMP threads than cores,
//! decodes that would fight for the cores take turns instead, and the calling thread waits, borrowing the
//! context and the batch for the call. Contexts of one thread each on a machine of N cores still decode N
//! at a time. (A process that mixes thread counts holds one set of lanes per count, and those can
//! oversubscribe the cores.) Everything else (reading and writing states, sampling, tokenizing) stays on the
//! calling thread.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::DecodeError;

use crate::sync::lock;

/// Name of the compute threads (visible in debuggers and `top -H`).
const THREAD_NAME: &str = "llama-sessions-compute";

/// The lanes of each thread count, started on first use and kept for the process's life, with the id of
/// the process that started them: a child made by `fork()` inherits the map but none of its threads, so it
/// starts lanes of its own instead of waiting for ever on threads that do not exist there.
static LANES: LazyLock<Mutex<Lanes>> = LazyLock::new(|| {
    Mutex::new(Lanes {
        process: std::process::id(),
        by_threads: BTreeMap::new(),
    })
});

struct Lanes {
    process: u32,
    by_threads: BTreeMap<u32, Arc<rayon_core::ThreadPool>>,
}

/// `ctx.decode(batch)`, run on a compute lane of contexts with `n_threads` threads while the caller waits (a
/// panic there unwinds here). The only place in the crate that calls `LlamaContext::decode`: clippy's
/// `disallowed-methods` (clippy.toml) refuses any other.
#[allow(clippy::disallowed_methods)]
pub(crate) fn decode(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    n_threads: u32,
) -> Result<(), DecodeError> {
    run(n_threads, || ctx.decode(batch))
}

/// How many lanes contexts of `n_threads` threads get on a machine of `cores` cores.
fn lane_count(cores: usize, n_threads: u32) -> usize {
    (cores / (n_threads.max(1) as usize)).max(1)
}

/// Runs `f` on a lane of `n_threads`-thread contexts and returns what it returns.
fn run<R: Send>(n_threads: u32, f: impl FnOnce() -> R + Send) -> R {
    let lanes = {
        let mut all = lock(&LANES);
        if all.process != std::process::id() {
            // Forked: the parent's pools have no threads here. Dropping one would signal threads that do not
            // exist, so they are forgotten instead.
            all.process = std::process::id();
            std::mem::forget(std::mem::take(&mut all.by_threads));
        }
        Arc::clone(all.by_threads.entry(n_threads).or_insert_with(|| {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            Arc::new(
                rayon_core::ThreadPoolBuilder::new()
                    .num_threads(lane_count(cores, n_threads))
                    .thread_name(|_| THREAD_NAME.to_owned())
                    .build()
                    // Only fails when the OS refuses a thread, and then llama.cpp could not run either.
                    .expect("the OS refused to start llama-sessions' compute thread"),
            )
        }))
    };
    lanes.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn one_lane_unless_the_threads_fit_the_cores_several_times() {
        assert_eq!(lane_count(2, 2), 1);
        assert_eq!(lane_count(2, 8), 1);
        assert_eq!(lane_count(2, 0), 2);
        assert_eq!(lane_count(16, 4), 4);
        assert_eq!(lane_count(1, 1), 1);
    }

    #[test]
    fn work_runs_on_a_compute_thread() {
        let names: Vec<Option<String>> = (0..4)
            .map(|_| {
                std::thread::spawn(|| run(64, || std::thread::current().name().map(str::to_owned)))
                    .join()
                    .unwrap()
            })
            .collect();
        assert_eq!(names, vec![Some(THREAD_NAME.to_owned()); 4]);
    }

    #[test]
    fn calls_from_many_threads_never_overlap() {
        let running = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (running, overlaps) = (running.clone(), overlaps.clone());
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        run(1 << 20, || {
                            if running.fetch_add(1, Ordering::SeqCst) != 0 {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            std::thread::sleep(Duration::from_micros(300));
                            running.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn one_thread_contexts_decode_side_by_side_up_to_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..cores + 2)
            .map(|_| {
                let (running, most) = (running.clone(), most.clone());
                std::thread::spawn(move || {
                    run(1, || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        // Give the others a moment to join this one.
                        let until = std::time::Instant::now() + Duration::from_millis(200);
                        while running.load(Ordering::SeqCst) < cores
                            && std::time::Instant::now() < until
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        running.fetch_sub(1, Ordering::SeqCst);
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), cores);
    }

    #[test]
    fn a_panic_on_the_compute_thread_reaches_the_caller_and_the_thread_goes_on() {
        let caught = std::panic::catch_unwind(|| run(2, || panic!("compute failed")));
        assert!(caught.is_err());
        assert_eq!(run(2, || 7), 7);
    }
}
