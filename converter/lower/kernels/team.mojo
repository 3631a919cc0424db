# Work of one kernel call done by the runtime's workers in one dispatch: phases of jobs.
from max.algorithm import parallelize
from std.atomic import Atomic, Ordering
from std.runtime import parallelism_level
from std.os import abort
from std.sys import inlined_assembly

comptime LINE = 8  # Int64 counters of one phase, one cache line: jobs claimed, jobs done


struct Crew(Movable):
    """One worker's walk through the phases of a team (`team`). Each phase is a number of jobs:
    the worker claims the phase's next unclaimed job until none is left, then waits until every
    job of the phase is done (by whichever worker claimed it) and goes on to the next phase.

    A worker only ever waits for jobs another worker has claimed and is running, never for a
    worker to arrive: a worker that starts late finds the early phases done and catches up, and
    one worker alone does every job. So the team cannot deadlock, whatever the runtime's thread
    pool does with the dispatch."""

    var ctr: UnsafePointer[Int64, MutUntrackedOrigin]
    var phases: Int
    var phase: Int

    def __init__(out self, ctr: UnsafePointer[Int64, MutUntrackedOrigin], phases: Int):
        self.ctr = ctr
        self.phases = phases
        self.phase = 0

    def share[F: def(Int) -> None](mut self, jobs: Int, body: F):
        """body(j) for the jobs j < `jobs` of the next phase that this worker claims; then wait
        until all of them are done. Every worker of the team must call share in the same order
        with the same `jobs`."""
        if self.phase >= self.phases:
            # a kernel's own mistake (more phases than it declared): stop rather than corrupt memory
            abort("whisper_max team: more phases shared than the team was made for")
        var line = self.ctr + self.phase * LINE
        self.phase += 1
        while True:
            var j = Int(Atomic.fetch_add[ordering=Ordering.RELAXED](line, Int64(1)))
            if j >= jobs:
                break
            body(j)
            # release: what the job wrote is visible to whoever sees the count
            _ = Atomic.fetch_add[ordering=Ordering.RELEASE](line + 1, Int64(1))
        while Int(Atomic.load[ordering=Ordering.ACQUIRE](line + 1)) < jobs:
            inlined_assembly["pause", NoneType, constraints="~{memory}", has_side_effect=True]()


def team[F: def(mut Crew) -> None](phases: Int, body: F):
    """body(crew) on every worker of the runtime, in one dispatch, each with its own Crew over
    `phases` shared phases (at most; body may share fewer). One dispatch to the workers costs
    ~8-12 us here (measured on an AMD EPYC Zen 4: 100 dispatches of an empty job 0.8-1.2 ms,
    100 phases of one team 0.01-0.02 ms), so a kernel of many short steps (a decoder block of
    one row: ~10 products and attentions of 10-100 us each) runs them as one team's phases
    instead of one dispatch each."""
    var workers = max(1, parallelism_level())
    var ctr = alloc[Int64](phases * LINE, alignment=64)
    for i in range(phases * LINE):
        ctr.store(i, Int64(0))

    def work(t: Int) {var ctr, var phases, ref body}:
        var crew = Crew(ctr, phases)
        body(crew)

    parallelize(work, workers)
    ctr.free()


def split(items: Int, per_worker: Int) -> Int:
    """Items per job when `items` are shared as jobs of whole items: about `per_worker` jobs for
    each worker (enough for a worker that starts late or is slowed to be made up for), one item
    at least."""
    return max(1, items // max(1, per_worker * parallelism_level()))
