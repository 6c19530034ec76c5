//! A gang of pinned worker threads that run one job at a time, all of them together: the small pool
//! behind `Pool` (pool.rs decides who computes what; this only starts and joins).
//!
//! - A job is a function of the share index. Each worker runs one share; on a one-node machine the
//!   caller runs share 0 itself (`caller_share`), elsewhere every share runs on a pinned worker.
//! - Each share has a CPU (`places`); its worker pins itself there. The caller is the application's
//!   thread and is never pinned, so the OS may run it on a worker's CPU, where the two share one
//!   core while the caller's own CPU idles: a 2048 x 2048 GEMV on 2 threads then took 39 us instead
//!   of 17 (half of all processes on our 2-vCPU VM). Each job therefore looks up the caller's CPU
//!   first and, if a worker is placed there, swaps the two places: that worker re-pins itself to the
//!   free CPU before its share.
//! - Between jobs a worker spins for `SPIN_WINDOW` before it parks, and the caller spins until the
//!   workers are done. Back-to-back calls therefore start and finish without a single wake-up, where
//!   rayon's (a sleeping worker woken, then a sleeping caller woken) cost ~12-13 us a call on a
//!   2-vCPU VM and 12-20 us on a 16-vCPU Xeon: more than a 2048 x 2048 GEMV computes on 2 threads.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it parks (then a job costs a wake-up).
/// A decode loop or a benchmark issues its calls microseconds apart; a server between requests
/// parks after this.
const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// Polls between yields of the core, for workers and the waiting caller alike: where threads
/// outnumber free cores (other processes, more threads than CPUs), a spinning thread would
/// otherwise hold a core for a whole scheduler slice while the thread it waits for cannot run.
const SPINS_PER_YIELD: u32 = 64;

/// The running job, on the stack of the `run` that posted it.
struct JobRef<'a>(&'a (dyn Fn(usize) + Sync));

struct Shared {
    /// The running job; non-null only between `run`'s epoch bump and its wait for `pending == 0`.
    /// A plain load for every worker: a lock here (even a read lock, whose count every reader
    /// updates) took 25 us per job on 16 threads against 10 us for the whole dispatch without it.
    job: AtomicPtr<JobRef<'static>>,
    /// Bumped once per job: a worker that sees a new value runs the job.
    epoch: AtomicUsize,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers asleep (or about to be) in `wake`; read without the lock on every job.
    parked: AtomicUsize,
    /// The CPU of each share (share 0: the caller's, with `caller_share`); changed only by `run`
    /// (one job at a time) before its epoch bump, so a worker that sees the epoch sees its place.
    places: Vec<AtomicUsize>,
    sleep: Mutex<()>,
    wake: Condvar,
}

thread_local! {
    /// Set while this thread runs a share of some gang's job: a nested `run` then runs inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Gang {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    caller_share: bool,
    /// One job at a time (callers on several threads queue here).
    dispatch: Mutex<()>,
}

impl Gang {
    /// A gang with one share per entry of `places` (a CPU each): with `caller_share`, workers for
    /// shares 1.. pinned by `pin(cpu)` and share 0 on the caller; without, a worker for every share.
    pub fn new(
        places: &[usize],
        caller_share: bool,
        pin: impl Fn(usize) + Send + Sync + 'static,
    ) -> std::io::Result<Gang> {
        let shares = places.len();
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            places: places.iter().map(|&cpu| AtomicUsize::new(cpu)).collect(),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let pin = Arc::new(pin);
        let first = usize::from(caller_share);
        let mut workers = Vec::with_capacity(shares.saturating_sub(first));
        for share in first..shares {
            let (for_worker, pin) = (shared.clone(), pin.clone());
            let handle = std::thread::Builder::new()
                .name(format!("nanochat-ternary-{share}"))
                .spawn(move || work(&for_worker, share, &*pin));
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    Gang::stop(&shared, workers);
                    return Err(e);
                }
            }
        }
        Ok(Gang { shared, workers, caller_share, dispatch: Mutex::new(()) })
    }

    /// Run `job(share)` for every share, each on its own thread; returns when all have finished.
    /// A panic in any share is re-raised here, after every share has finished.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let shares = self.workers.len() + usize::from(self.caller_share);
        if self.workers.is_empty() || IN_JOB.with(Cell::get) {
            (0..shares).for_each(job);
            return;
        }
        let _one_job_at_a_time = lock(&self.dispatch);
        let shared = &*self.shared;
        if self.caller_share {
            shared.make_room_for_caller();
        }
        let posted = JobRef(job);
        // Workers dereference this only between the epoch bump below and their `pending` decrement;
        // `Join` (whose drop also runs if the caller's share unwinds) waits for `pending == 0` and
        // clears the pointer before `posted` goes out of scope.
        shared.job.store(&posted as *const JobRef<'_> as *mut JobRef<'static>, Ordering::Release);
        shared.pending.store(self.workers.len(), Ordering::Release);
        // SeqCst pairs with the parking worker's increment then epoch check: one of the two sees
        // the other, so a worker never sleeps through a job it was not woken for.
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.parked.load(Ordering::SeqCst) > 0 {
            let _sleepers_wait_or_see_the_epoch = lock(&shared.sleep);
            shared.wake.notify_all();
        }
        let join = Join(shared);
        if self.caller_share {
            run_share(job, 0, shared);
        }
        drop(join);
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a ternary kernel thread panicked (see its message above)");
        }
    }

    fn stop(shared: &Shared, workers: Vec<JoinHandle<()>>) {
        shared.shutdown.store(true, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        drop(lock(&shared.sleep));
        shared.wake.notify_all();
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Gang {
    fn drop(&mut self) {
        Gang::stop(&self.shared, std::mem::take(&mut self.workers));
    }
}

impl Shared {
    /// If a worker is placed on the CPU the caller runs on, trade places: the worker moves to the
    /// caller's (now free) place at the start of the next job.
    fn make_room_for_caller(&self) {
        let Some(here) = current_cpu() else { return };
        let mine = self.places[0].load(Ordering::Relaxed);
        if here == mine {
            return;
        }
        if let Some(worker) = self.places[1..].iter().find(|p| p.load(Ordering::Relaxed) == here) {
            worker.store(mine, Ordering::Relaxed);
            self.places[0].store(here, Ordering::Relaxed);
        }
    }
}

/// The CPU the calling thread runs on now (Linux: the vDSO's getcpu, tens of nanoseconds).
fn current_cpu() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu takes no arguments and only returns a number (-1 on failure).
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Waits for the workers' shares of the current job, then clears it (on return and on unwind).
struct Join<'a>(&'a Shared);

impl Drop for Join<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.pending.load(Ordering::Acquire) > 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(SPINS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.0.job.store(std::ptr::null_mut(), Ordering::Release);
    }
}

fn run_share(job: &(dyn Fn(usize) + Sync + '_), share: usize, shared: &Shared) {
    IN_JOB.with(|f| f.set(true));
    if catch_unwind(AssertUnwindSafe(|| job(share))).is_err() {
        shared.panicked.store(true, Ordering::Release);
    }
    IN_JOB.with(|f| f.set(false));
}

/// A worker: wait for each new epoch, move to its place if that changed, run its share, report it done.
fn work(shared: &Shared, share: usize, pin: &(dyn Fn(usize) + Send + Sync)) {
    let mut place = shared.places[share].load(Ordering::Relaxed);
    pin(place);
    let mut seen = 0;
    loop {
        seen = next_epoch(shared, seen);
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let now = shared.places[share].load(Ordering::Relaxed);
        if now != place {
            place = now;
            pin(place);
        }
        let posted = shared.job.load(Ordering::Acquire);
        // SAFETY: a new epoch with `shutdown` unset means `run` stored a pointer to its live
        // `JobRef` before the bump and keeps it alive until this worker's `pending` decrement below
        // (`Join`); null cannot be seen here, but is skipped anyway.
        if let Some(job) = unsafe { posted.as_ref() } {
            run_share(job.0, share, shared);
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The first epoch after `seen`: polled for SPIN_WINDOW (yielding the core now and then), then
/// waited for asleep.
fn next_epoch(shared: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return epoch;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            if start.elapsed() > SPIN_WINDOW {
                break;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    let mut guard = lock(&shared.sleep);
    shared.parked.fetch_add(1, Ordering::SeqCst);
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            shared.parked.fetch_sub(1, Ordering::SeqCst);
            return epoch;
        }
        guard = shared.wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_share_runs_once_per_job() {
        for caller_share in [true, false] {
            let gang = Gang::new(&[0, 1, 2], caller_share, |_| {}).unwrap();
            let counts: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
            for _ in 0..1000 {
                gang.run(&|share| {
                    counts[share].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1000), "caller_share {caller_share}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_worker_on_the_callers_cpu_trades_places() {
        let Some(here) = current_cpu() else { panic!("sched_getcpu failed") };
        crate::pool::pin_to_cpu(here); // this test's own thread stays where it is
        let elsewhere = here + 1000; // never a real CPU: the recorded pins say who moved where
        let pins = Arc::new(Mutex::new(Vec::new()));
        let record = pins.clone();
        let gang = Gang::new(&[elsewhere, here], true, move |cpu| lock(&record).push(cpu)).unwrap();
        let ran = AtomicU64::new(0);
        for _ in 0..3 {
            gang.run(&|_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(ran.load(Ordering::Relaxed), 6);
        let places: Vec<usize> = gang.shared.places.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        assert_eq!(places, vec![here, elsewhere], "the caller keeps its CPU, the worker takes the free one");
        // pinned where it was placed when it started (before or after the first job's swap), then moved
        let pins = lock(&pins).clone();
        assert!(pins == [here, elsewhere] || pins == [elsewhere], "pins: {pins:?}");
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let gang = Gang::new(&[0, 1], true, |_| {}).unwrap();
        let sum = AtomicU64::new(0);
        gang.run(&|share| {
            sum.fetch_add(share as u64 + 1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN_WINDOW * 5); // the worker parks
        gang.run(&|share| {
            sum.fetch_add(share as u64 + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_panicking_share_is_reraised_after_all_finish() {
        let gang = Gang::new(&[0, 1], true, |_| {}).unwrap();
        let finished = AtomicU64::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            gang.run(&|share| {
                if share == 1 {
                    panic!("share 1 fails");
                }
                std::thread::sleep(Duration::from_millis(5));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 1);
        // the gang still works afterwards
        let ran = AtomicU64::new(0);
        gang.run(&|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_nested_run_runs_inline() {
        let gang = Gang::new(&[0, 1], true, |_| {}).unwrap();
        let inner = AtomicU64::new(0);
        gang.run(&|_| {
            gang.run(&|_| {
                inner.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(inner.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn callers_on_several_threads_take_turns() {
        let gang = Gang::new(&[0, 1], true, |_| {}).unwrap();
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        gang.run(&|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 2);
    }
}
