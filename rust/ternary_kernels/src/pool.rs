//! A pinned, NUMA-aware thread pool that splits a matrix's row tiles across threads.
//!
//! - Threads: an explicit count, else NANOCHAT_THREADS, else every online CPU. Thread i is pinned
//!   to one CPU (sched_setaffinity); nodes take turns (topology.rs) so threads spread evenly.
//! - Placement: `place` packs a matrix as one part per node in use, each part created (first-touched)
//!   by a thread of that node; `run` then gives each node's part to that node's threads.
//! - The threads are a `Gang` (gang.rs): on a one-node machine the caller computes thread 0's share
//!   itself and the others are pinned workers that spin between calls; with several nodes every
//!   share runs on a pinned worker of its node (the caller may sit on any node).
//! - Small jobs (few multiply-adds) run on the calling thread: even a spinning worker costs a
//!   cache-line round trip, and the engine calls 768x768 GEMVs about a hundred times per token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::gang::Gang;
use crate::matmul::WorkItem;
use crate::topology::Topology;

/// What `Pool::run` returns: each work item with its output block.
pub type Pieces = Vec<(WorkItem, Vec<f32>)>;

/// Below this many multiply-adds per call, one thread does the whole job.
pub const PARALLEL_MIN_WORK: usize = 1 << 22;

pub struct Pool {
    threads: usize,
    /// Node index (into the topology) of each thread.
    thread_node: Vec<usize>,
    /// Distinct nodes in use, in first-use order; parts of a placed matrix follow this order.
    nodes_in_use: Vec<usize>,
    workers: Option<Gang>,
}

/// Pin the calling thread to `cpu`; failure (e.g. a restricted container) only costs locality.
pub(crate) fn pin_to_cpu(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is a plain bit array for which all-zero is a valid value; CPU_SET only
        // writes inside it (bounds-checked by libc against CPU_SETSIZE), and sched_setaffinity(0, ..)
        // reads exactly size_of::<cpu_set_t>() bytes from a live local.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if cpu < libc::CPU_SETSIZE as usize {
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// NANOCHAT_THREADS if set (must be a positive integer), else None.
pub fn threads_from_env() -> Result<Option<usize>> {
    match std::env::var("NANOCHAT_THREADS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::Threads(format!("NANOCHAT_THREADS: expected a positive integer, got {v:?}"))),
        },
        _ => Ok(None),
    }
}

impl Pool {
    /// A pool of `threads` pinned threads over `topo` (1 thread: no workers, everything inline).
    pub fn new(threads: usize, topo: &Topology) -> Result<Pool> {
        if threads == 0 {
            return Err(Error::Threads("thread count must be at least 1, got 0".into()));
        }
        let assignment = topo.assign(threads);
        let thread_node: Vec<usize> = assignment.iter().map(|&(_, node)| node).collect();
        let mut nodes_in_use = Vec::new();
        for &n in &thread_node {
            if !nodes_in_use.contains(&n) {
                nodes_in_use.push(n);
            }
        }
        let workers = if threads > 1 {
            let cpus: Vec<usize> = assignment.iter().map(|&(cpu, _)| cpu).collect();
            let gang = Gang::new(&cpus, nodes_in_use.len() == 1, pin_to_cpu)
                .map_err(|e| Error::Threads(format!("cannot start {threads} threads: {e}")))?;
            Some(gang)
        } else {
            None
        };
        Ok(Pool { threads, thread_node, nodes_in_use, workers })
    }

    /// Threads from NANOCHAT_THREADS, else all CPUs of the detected topology.
    pub fn from_env() -> Result<Pool> {
        let topo = Topology::detect();
        let threads = threads_from_env()?.unwrap_or(topo.cpu_count());
        Pool::new(threads, &topo)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How a matrix of `tiles` row tiles is split into parts: one per node in use, sized by its threads.
    pub fn part_ranges(&self, tiles: usize) -> Vec<std::ops::Range<usize>> {
        let weights: Vec<usize> =
            self.nodes_in_use.iter().map(|n| self.thread_node.iter().filter(|t| *t == n).count()).collect();
        split_weighted(tiles, &weights)
    }

    /// Build one part per node in use, each inside a thread of its node (so its pages live there).
    pub fn place<P: Send>(&self, tiles: usize, build: impl Fn(std::ops::Range<usize>) -> P + Sync) -> Vec<P> {
        let ranges = self.part_ranges(tiles);
        self.on_nodes(|slot| build(ranges[slot].clone()))
    }

    /// `f(slot)` for each node in use (in `nodes_in_use` order), run on a thread of that node so that
    /// what it allocates and first touches lives there; on one node, on the caller.
    pub fn on_nodes<P: Send>(&self, f: impl Fn(usize) -> P + Sync) -> Vec<P> {
        let slots = self.nodes_in_use.len();
        let workers = match &self.workers {
            Some(workers) if slots > 1 => workers,
            // One node: wherever the caller runs, the pages land on the only node.
            _ => return (0..slots).map(&f).collect(),
        };
        let results: Vec<Mutex<Option<P>>> = (0..slots).map(|_| Mutex::new(None)).collect();
        workers.run(&|thread| {
            let node = self.thread_node[thread];
            let first_of_node = self.thread_node.iter().position(|n| *n == node) == Some(thread);
            if let (true, Some(slot)) = (first_of_node, self.nodes_in_use.iter().position(|n| *n == node)) {
                let out = f(slot);
                if let Ok(mut r) = results[slot].lock() {
                    *r = Some(out);
                }
            }
        });
        // A poisoned or empty slot cannot happen without a panic in `f` (re-raised by `run`).
        results
            .into_iter()
            .enumerate()
            .map(|(slot, r)| r.into_inner().ok().flatten().unwrap_or_else(|| f(slot)))
            .collect()
    }

    /// Parts a matrix placed by this pool has (one per node in use).
    pub fn nodes(&self) -> usize {
        self.nodes_in_use.len()
    }

    /// Per-thread work lists: if the parts follow this pool's nodes, each node's threads split its
    /// part; otherwise all tiles are split evenly over all threads.
    pub fn plan(&self, part_tiles: &[usize]) -> Vec<Vec<WorkItem>> {
        let mut plan = vec![Vec::new(); self.threads];
        if part_tiles.len() == self.nodes_in_use.len() {
            for (slot, &node) in self.nodes_in_use.iter().enumerate() {
                let members: Vec<usize> = (0..self.threads).filter(|&t| self.thread_node[t] == node).collect();
                for (member, range) in members.iter().zip(split_weighted(part_tiles[slot], &vec![1; members.len()])) {
                    if !range.is_empty() {
                        plan[*member].push(WorkItem { part: slot, tiles: range });
                    }
                }
            }
            return plan;
        }
        let total: usize = part_tiles.iter().sum();
        let shares = split_weighted(total, &vec![1; self.threads]);
        let mut offset = 0;
        for (part, &n) in part_tiles.iter().enumerate() {
            for (thread, share) in shares.iter().enumerate() {
                let start = share.start.max(offset) - offset;
                let end = share.end.min(offset + n).saturating_sub(offset);
                if start < end {
                    plan[thread].push(WorkItem { part, tiles: start..end });
                }
            }
            offset += n;
        }
        plan
    }

    /// Run `f` on every work item of a matrix with `part_tiles` tiles per part; returns (item, output).
    /// `work` is the job's multiply-add count: small jobs run inline on the calling thread.
    pub fn run<F>(&self, part_tiles: &[usize], work: usize, f: F) -> Pieces
    where
        F: Fn(&WorkItem) -> Vec<f32> + Sync,
    {
        let whole = || {
            whole_parts(part_tiles)
                .into_iter()
                .map(|item| {
                    let out = f(&item);
                    (item, out)
                })
                .collect()
        };
        let Some(workers) = self.workers.as_ref() else { return whole() };
        if work < PARALLEL_MIN_WORK {
            return whole();
        }
        let plan = self.plan(part_tiles);
        let slots: Vec<Mutex<Pieces>> = plan.iter().map(|_| Mutex::new(Vec::new())).collect();
        workers.run(&|thread| {
            let pieces = plan[thread].iter().map(|item| (item.clone(), f(item))).collect();
            if let Ok(mut slot) = slots[thread].lock() {
                *slot = pieces;
            }
        });
        slots.into_iter().flat_map(|slot| slot.into_inner().unwrap_or_default()).collect()
    }

    /// One token: `f(item, rows)` writes each work item's outputs straight into its rows of y, which
    /// holds every part's tiles in order (`first_tiles`: each part's first tile): no block per item,
    /// no gather (2048 x 2048 GEMV on 2 threads, 8 alternating runs: median 21.6 -> 20.7 us).
    ///
    /// Each thread's share is cut into `PIECES_PER_THREAD` pieces that it takes in order; a thread
    /// that has finished its own takes the pieces still left by the other threads of its node, so a
    /// thread whose core another process holds does not make the whole call wait for it.
    pub fn run_rows<F>(&self, part_tiles: &[usize], first_tiles: &[usize], work: usize, y: &mut [f32], f: F)
    where
        F: Fn(&WorkItem, &mut [f32]) + Sync,
    {
        use crate::format::ROWS_PER_TILE;
        let serial = self.workers.is_none() || work < PARALLEL_MIN_WORK;
        let plan = if serial { vec![whole_parts(part_tiles)] } else { self.plan(part_tiles) };
        let pieces = if serial { 1 } else { PIECES_PER_THREAD };
        // every piece's rows of y, cut in row order (pieces never overlap), then handed back by thread
        let mut order: Vec<(usize, usize, WorkItem)> = Vec::new();
        for (thread, items) in plan.iter().enumerate() {
            for item in items {
                for cut in split_weighted(item.tiles.len(), &vec![1; pieces]).into_iter().filter(|c| !c.is_empty()) {
                    let tiles = item.tiles.start + cut.start..item.tiles.start + cut.end;
                    let row0 = (first_tiles[item.part] + tiles.start) * ROWS_PER_TILE;
                    order.push((row0, thread, WorkItem { part: item.part, tiles }));
                }
            }
        }
        order.sort_by_key(|o| o.0);
        let mut per_thread: Vec<Vec<PieceSlot>> = plan.iter().map(|_| Vec::new()).collect();
        let (mut rest, mut at) = (y, 0);
        for (row0, thread, piece) in order {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(row0 - at);
            let (rows, tail) = tail.split_at_mut(piece.tiles.len() * ROWS_PER_TILE);
            at = row0 + piece.tiles.len() * ROWS_PER_TILE;
            per_thread[thread].push(Mutex::new(Some((piece, rows))));
            rest = tail;
        }
        // each thread's pieces are consecutive tiles, in order
        let shares: Vec<Share> =
            per_thread.into_iter().map(|pieces| Share { next: AtomicUsize::new(0), pieces }).collect();
        let run = |thread: usize| {
            let n = shares.len();
            let node = self.thread_node[thread];
            // its own pieces first, then what the other threads of its node left (their parts live there)
            for victim in (0..n).map(|i| (thread + i) % n).filter(|&v| self.thread_node[v] == node) {
                let share = &shares[victim];
                loop {
                    let i = share.next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = share.pieces.get(i) else { break };
                    // each index is claimed once, so the lock is never contended
                    let taken = slot.lock().ok().and_then(|mut s| s.take());
                    if let Some((piece, rows)) = taken {
                        f(&piece, rows);
                    }
                }
            }
        };
        match &self.workers {
            Some(workers) if !serial => workers.run(&run),
            _ => run(0),
        }
    }
}

impl Pool {
    /// Tokens per share when a multi-token call should split its tokens over the threads rather
    /// than its rows: on one node (every thread may read every part), with at least 2 tokens per
    /// thread and M a whole number of tiles. Each share then quantizes its own tokens, where a row
    /// split quantized (and copied into lanes) all of them on the caller while the workers waited,
    /// and writes its rows of y in place instead of a block gathered afterwards.
    pub fn token_split(&self, tokens: usize, rows: usize, work: usize) -> Option<usize> {
        let parallel = self.workers.is_some() && work >= PARALLEL_MIN_WORK;
        let fits = self.nodes_in_use.len() == 1
            && tokens >= 2 * self.threads
            && rows.is_multiple_of(crate::format::ROWS_PER_TILE);
        (parallel && fits).then(|| tokens.div_ceil(self.threads))
    }

    /// `f(share, chunk)` for the consecutive chunks of `chunk_len` values of y, one per thread (at
    /// most `threads` chunks: callers size them with `token_split`).
    pub fn run_chunks<F>(&self, y: &mut [f32], chunk_len: usize, f: F)
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let chunks: Vec<Mutex<Option<&mut [f32]>>> =
            y.chunks_mut(chunk_len.max(1)).map(|c| Mutex::new(Some(c))).collect();
        let run = |share: usize| {
            let taken = chunks.get(share).and_then(|c| c.lock().ok().and_then(|mut c| c.take()));
            if let Some(chunk) = taken {
                f(share, chunk);
            }
        };
        match &self.workers {
            Some(workers) if chunks.len() > 1 => workers.run(&run),
            _ => (0..chunks.len()).for_each(run),
        }
    }
}

/// Pieces a thread's share of a one-token call is cut into (`Pool::run_rows`).
const PIECES_PER_THREAD: usize = 4;

/// A piece of a one-token call: its tiles and its rows of y, for whichever thread claims it.
type PieceSlot<'a> = Mutex<Option<(WorkItem, &'a mut [f32])>>;

/// One thread's pieces and the index of the next unclaimed one (on a cache line of its own: the
/// owner claims from it for every piece).
#[repr(align(64))]
struct Share<'a> {
    next: AtomicUsize,
    pieces: Vec<PieceSlot<'a>>,
}

/// One work item per part, covering all its tiles: a job run on the calling thread.
fn whole_parts(part_tiles: &[usize]) -> Vec<WorkItem> {
    part_tiles.iter().enumerate().map(|(part, &n)| WorkItem { part, tiles: 0..n }).collect()
}

/// Split `n` into contiguous ranges proportional to `weights` (every unit goes somewhere).
pub fn split_weighted(n: usize, weights: &[usize]) -> Vec<std::ops::Range<usize>> {
    let total: usize = weights.iter().sum::<usize>().max(1);
    let mut out = Vec::with_capacity(weights.len());
    let mut acc = 0;
    let mut start = 0;
    for &w in weights {
        acc += w;
        let end = n * acc / total;
        out.push(start..end);
        start = end;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The process-wide pool used by the Python bindings.

static GLOBAL: RwLock<Option<Arc<Pool>>> = RwLock::new(None);

/// The shared pool, created on first use from NANOCHAT_THREADS / the topology.
pub fn global() -> Result<Arc<Pool>> {
    if let Ok(guard) = GLOBAL.read() {
        if let Some(pool) = guard.as_ref() {
            return Ok(pool.clone());
        }
    }
    let mut guard = GLOBAL.write().map_err(|_| Error::Threads("thread pool lock poisoned".into()))?;
    if guard.is_none() {
        *guard = Some(Arc::new(Pool::from_env()?));
    }
    guard.as_ref().cloned().ok_or_else(|| Error::Threads("thread pool missing".into()))
}

/// Replace the shared pool with one of `threads` threads.
pub fn set_global_threads(threads: usize) -> Result<()> {
    let pool = Pool::new(threads, &Topology::detect())?;
    let mut guard = GLOBAL.write().map_err(|_| Error::Threads("thread pool lock poisoned".into()))?;
    *guard = Some(Arc::new(pool));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Node;

    fn two_nodes() -> Topology {
        Topology { nodes: vec![Node { id: 0, cpus: vec![0, 1] }, Node { id: 1, cpus: vec![2, 3] }] }
    }

    #[test]
    fn a_slow_threads_pieces_are_taken_by_the_others() {
        let pool = Pool::new(3, &Topology { nodes: vec![Node { id: 0, cpus: vec![0, 1, 2] }] }).unwrap();
        let tiles = 48;
        let slow_share = pool.plan(&[tiles])[1][0].tiles.clone();
        let mut y = vec![0f32; tiles * 4];
        let ran: Mutex<Vec<(std::ops::Range<usize>, bool)>> = Mutex::new(Vec::new());
        pool.run_rows(&[tiles], &[0], usize::MAX, &mut y, |item, rows| {
            let slow = std::thread::current().name() == Some("nanochat-ternary-1");
            if slow {
                std::thread::sleep(std::time::Duration::from_millis(50)); // its core is taken, say
            }
            rows.iter_mut().enumerate().for_each(|(i, r)| *r += (item.tiles.start * 4 + i) as f32 + 1.0);
            ran.lock().unwrap().push((item.tiles.clone(), slow));
        });
        // every row written exactly once, with its own value
        assert!(y.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
        let ran = ran.into_inner().unwrap();
        let by_slow: usize = ran.iter().filter(|(_, slow)| *slow).map(|(t, _)| t.len()).sum();
        assert!(by_slow < slow_share.len(), "the slow thread ran all {by_slow} tiles of its share itself");
        assert_eq!(ran.len(), 3 * PIECES_PER_THREAD);
    }

    #[test]
    fn split_covers_everything() {
        assert_eq!(split_weighted(10, &[1, 1, 1]), vec![0..3, 3..6, 6..10]);
        assert_eq!(split_weighted(2, &[1, 1, 1]), vec![0..0, 0..1, 1..2]);
    }

    #[test]
    fn plan_follows_nodes() {
        let pool = Pool::new(4, &two_nodes()).unwrap();
        assert_eq!(pool.part_ranges(10), vec![0..5, 5..10]);
        let plan = pool.plan(&[5, 5]);
        // threads alternate nodes: 0 -> node 0, 1 -> node 1, 2 -> node 0, 3 -> node 1
        assert_eq!(plan[0], vec![WorkItem { part: 0, tiles: 0..2 }]);
        assert_eq!(plan[2], vec![WorkItem { part: 0, tiles: 2..5 }]);
        assert_eq!(plan[1], vec![WorkItem { part: 1, tiles: 0..2 }]);
        assert_eq!(plan[3], vec![WorkItem { part: 1, tiles: 2..5 }]);
    }

    #[test]
    fn plan_without_matching_parts_splits_evenly() {
        let pool = Pool::new(2, &two_nodes()).unwrap();
        let plan = pool.plan(&[3]);
        assert_eq!(plan, vec![vec![WorkItem { part: 0, tiles: 0..1 }], vec![WorkItem { part: 0, tiles: 1..3 }]]);
    }
}
