//! Parallel loops of the CPU ops on candle's own thread pool.
//!
//! candle's elementwise ops run on its barrier pool (the calling thread plus `threads - 1` workers
//! that spin briefly, then park); rayon keeps a second pool of `threads` workers that spin with
//! `sched_yield` for a while after every job. Ops that used both made the two pools fight for the
//! same cores between every pair of ops: on 2 cores a ResNet training step spent a third of its time
//! in the scheduler (840,000 `sched_yield` and 680,000 `futex` calls for two steps). The convolution
//! ops therefore split their batch over candle's pool, whole samples per thread with single-threaded
//! gemm calls inside, and leave rayon idle.
//!
//! The closures given here must not call candle ops themselves: the pool is not reentrant.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

/// candle's CPU thread count, looked up once (candle re-reads /proc and /sys on every call).
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Whether a batch of `b` samples is worth spreading over the threads whole samples at a time
/// (every thread gets at least one); otherwise the caller parallelizes inside each sample.
pub(crate) fn split_by_sample(b: usize) -> bool {
    b >= threads() && threads() > 1
}

/// Calls `f(scratch, i, chunk)` for every `len`-element chunk `i` of `data`, spread over candle's CPU
/// threads (the caller's thread included), claiming chunks from a shared cursor so that a slow thread
/// holds up no other. Each thread gets one `scratch()` for all the chunks it takes (window buffers and
/// the like); the chunks are uninitialized on entry and `f` must write every element of its chunk.
///
/// Returns once every chunk is done. The last chunk is shorter when `data.len()` is not a multiple
/// of `len`.
pub(crate) fn for_each_chunk<T, S, F>(
    data: &mut [MaybeUninit<T>],
    len: usize,
    scratch: impl Fn() -> S + Sync,
    f: F,
) where
    T: Send,
    F: Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync,
{
    assert!(len > 0, "for_each_chunk: chunks of 0 elements");
    let (total, chunks) = (data.len(), data.len().div_ceil(len));
    let base = data.as_mut_ptr() as usize;
    let cursor = AtomicUsize::new(0);
    let work = |_thread: usize| {
        let mut state: Option<S> = None;
        loop {
            let i = cursor.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                break;
            }
            // SAFETY: the cursor hands every index in 0..chunks to exactly one thread, so the chunks
            // are disjoint, and all lie inside `data`, which outlives this call.
            let chunk = unsafe {
                std::slice::from_raw_parts_mut((base as *mut MaybeUninit<T>).add(i * len), len.min(total - i * len))
            };
            f(state.get_or_insert_with(&scratch), i, chunk);
        }
    };
    if chunks == 1 || threads() == 1 {
        work(0);
    } else {
        candle_core::utils::barrier_pool().execute(work);
    }
}

/// [`for_each_chunk`] over initialized data.
pub(crate) fn for_each_chunk_init<T, S, F>(data: &mut [T], len: usize, scratch: impl Fn() -> S + Sync, f: F)
where
    T: Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync,
{
    // SAFETY: `MaybeUninit<T>` has `T`'s layout and every element is initialized; `f` sees them as
    // `T` again and can only store initialized values.
    let uninit = unsafe { &mut *(data as *mut [T] as *mut [MaybeUninit<T>]) };
    for_each_chunk(uninit, len, scratch, |s, i, chunk| {
        let chunk = unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) };
        f(s, i, chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_last_chunk_is_visited() {
        let mut data = vec![0usize; 7];
        for_each_chunk_init(&mut data, 3, || (), |_, i, chunk| chunk.iter_mut().for_each(|v| *v = i + 1));
        assert_eq!(data, [1, 1, 1, 2, 2, 2, 3]);
    }

    #[test]
    fn every_chunk_is_visited_once() {
        let mut data = vec![0usize; 7 * 3];
        for_each_chunk_init(&mut data, 3, || 0usize, |seen, i, chunk| {
            *seen += 1;
            chunk.iter_mut().for_each(|v| *v += i + 1);
        });
        for (i, chunk) in data.chunks(3).enumerate() {
            assert_eq!(chunk, [i + 1; 3]);
        }
    }
}
