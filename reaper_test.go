package sandboxpool_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

// Guarantee 3: the provider deadline of a new sandbox is its idle deadline.
func TestCreateAlignsProviderDeadline(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	l.Release()
	dl, ok := e.p.Deadline(l.Sandbox().ID)
	require.True(t, ok)
	assert.Equal(t, e.clock.Now().Add(5*time.Minute), dl)
}

// Guarantee 4 when the system's wall clock steps back (set by hand, or by
// a time service that steps): a sandbox in use gets its keepalive on time,
// as measured by E2B's clock, where a Manager that kept its deadlines on
// the wall clock found nothing due until the step had passed too, and E2B
// ended the sandbox meanwhile.
func TestWallClockStepBackDoesNotDelayAKeepalive(t *testing.T) {
	epoch := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	var elapsed, step atomic.Int64 // real time since epoch, and the wall clock's error
	p := fp.New()
	p.Now = func() time.Time { return epoch.Add(time.Duration(elapsed.Load())) } // E2B keeps real time
	cfg := sandboxpool.Config{Provider: p}
	sandboxpool.SetClockSource(&cfg, func() (int64, int64) {
		return epoch.UnixNano() + elapsed.Load() + step.Load(), elapsed.Load()
	})
	sandboxpool.ManualReaper(&cfg)
	m, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close(context.Background())) })

	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l.Release()
	id := l.Sandbox().ID
	elapsed.Add(int64(3 * time.Minute))
	step.Store(-int64(4 * time.Minute)) // within IdleTimeout: slewed
	elapsed.Add(int64(time.Minute))     // within the keepalive's lead (77 s) of E2B's 5 min deadline
	m.ReapNow()
	assert.EqualValues(t, 1, m.Stats().Touches)
	dl, alive := p.Deadline(id)
	require.True(t, alive)
	assert.True(t, dl.After(epoch.Add(5*time.Minute)), "E2B's deadline was pushed before it passed (%s)", dl.Sub(epoch))
}

func TestReaperEvictsIdle(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	l.Release()
	e.clock.Advance(4 * time.Minute)
	e.m.ReapNow()
	assert.EqualValues(t, 1, e.m.Stats().Active, "not idle long enough")
	e.clock.Advance(time.Minute)
	e.m.ReapNow()
	assert.EqualValues(t, 0, e.m.Stats().Active)
	assert.EqualValues(t, 1, e.m.Stats().Evictions)
	require.Eventually(t, func() bool { return e.p.Calls(fp.OpKill) == 1 }, 5*time.Second, time.Millisecond)
	_, alive := e.p.Deadline(id)
	assert.False(t, alive)
	assert.Equal(t, 0, e.m.Scheduled())
}

// Use keeps a sandbox alive: the reaper pushes the provider deadline before
// it passes, and does not evict.
func TestUseExtendsDeadline(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	l.Release()
	for range 4 { // 4 × 3 min = 12 min > IdleTimeout, with use every 3 min
		e.run(3 * time.Minute) // the reaper ticks meanwhile
		l := e.acquire(t, "u", "p")
		require.Equal(t, id, l.Sandbox().ID)
		l.Release()
		dl, ok := e.p.Deadline(id)
		require.True(t, ok, "provider must not reap a sandbox in use")
		assert.True(t, dl.After(e.clock.Now().Add(time.Minute)), "deadline %v too close to %v", dl, e.clock.Now())
	}
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	assert.Positive(t, e.m.Stats().Touches)
	assert.EqualValues(t, 0, e.p.Calls(fp.OpConnect), "touches are SetTimeout only")
	assert.EqualValues(t, 4, e.p.Calls(fp.OpCheck), "one probe per use older than HealthCheckAfter")
}

// A keepalive the provider fails with anything but a definitive not-found
// (a 503, a timeout) keeps the sandbox and is tried again until one
// succeeds, before the deadline passes: a lease never loses its sandbox to
// a blip. The tries are spaced a quarter of the way to the deadline, not
// made at every tick (see TestKeepaliveBacksOffWhileTheProviderRefuses).
func TestFailedKeepaliveIsRetriedBeforeTheDeadline(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	defer l.Release()
	id := l.Sandbox().ID
	first, _ := e.p.Deadline(id)
	blip := errors.New("fake: 503 Service Unavailable")
	e.p.FailNext(fp.OpSetTimeout, blip, blip)
	e.run(3*time.Minute + 35*time.Second) // the first keepalive: visitLead (85 s here) before the deadline
	require.EqualValues(t, 1, e.p.Calls(fp.OpSetTimeout), "the first keepalive, which failed")
	e.run(3 * reapTick)
	assert.EqualValues(t, 1, e.p.Calls(fp.OpSetTimeout), "the retry waits a quarter of the 85 s left, not a tick")
	e.run(50 * time.Second) // to 20 s short of the deadline
	assert.EqualValues(t, 3, e.p.Calls(fp.OpSetTimeout), "two failures, then the keepalive that held")
	assert.EqualValues(t, 2, e.m.Stats().TouchErrors)
	dl, ok := e.p.Deadline(id)
	require.True(t, ok, "the provider reaped a leased sandbox")
	assert.True(t, dl.After(first), "the deadline was never pushed")
	assert.EqualValues(t, 0, e.p.Calls(fp.OpKill))
	assert.EqualValues(t, 1, e.m.Stats().Active)
}

// Guarantee 4: a leased sandbox is never reaped for idleness, and its
// provider deadline is kept extended (keepalive).
func TestReaperNeverReapsLeased(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	for range 7 { // 7 × 2 min = 14 min, past IdleTimeout twice, inside MaxAge
		e.clock.Advance(2 * time.Minute)
		e.m.ReapNow()
		_, ok := e.p.Deadline(id)
		require.True(t, ok, "leased sandbox must stay alive")
	}
	assert.EqualValues(t, 0, e.m.Stats().Evictions)
	assert.EqualValues(t, 1, e.m.Stats().Active)
	l.Release()
	e.clock.Advance(time.Minute) // at MaxAge: retired and killed now that it is released
	e.m.ReapNow()
	require.Eventually(t, func() bool { return len(e.p.Killed()) == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, id, e.p.Killed()[0])
}

// A sandbox past MaxAge is not handed out again; it is killed at its last
// release, and the pair gets a fresh one.
func TestMaxAgeRetiresAndKillsAtLastRelease(t *testing.T) {
	e := newEnv(t)
	held := e.acquire(t, "u", "p")
	old := held.Sandbox().ID
	for range 8 { // keep it in use (keepalive) up to 16 min
		e.clock.Advance(2 * time.Minute)
		e.m.ReapNow()
	}
	l := e.acquire(t, "u", "p")
	assert.NotEqual(t, old, l.Sandbox().ID, "past MaxAge: never handed out again")
	l.Release()
	_, ok := e.p.Deadline(old)
	require.True(t, ok, "still leased: not killed yet")
	held.Release()
	require.Eventually(t, func() bool { _, ok := e.p.Deadline(old); return !ok }, 5*time.Second, time.Millisecond)
	assert.Contains(t, e.p.Killed(), old)
	assert.EqualValues(t, 1, e.m.Stats().Active)
}

// The reaper retires an unleased sandbox at MaxAge even if it is used
// continuously.
func TestMaxAgeWithContinuousUse(t *testing.T) {
	e := newEnv(t)
	first := e.acquire(t, "u", "p")
	id := first.Sandbox().ID
	first.Release()
	for range 15 {
		e.clock.Advance(time.Minute)
		e.acquire(t, "u", "p").Release()
		e.m.ReapNow()
	}
	require.Eventually(t, func() bool { _, ok := e.p.Deadline(id); return !ok }, 5*time.Second, time.Millisecond)
	l := e.acquire(t, "u", "p")
	defer l.Release()
	assert.NotEqual(t, id, l.Sandbox().ID)
	assert.EqualValues(t, 2, e.p.Calls(fp.OpCreate))
}

// A tick pops only what is due: with 10,000 sandboxes of which 10 expire,
// the reaper visits 10 and kills 10.
func TestReaperCostProportionalToExpiries(t *testing.T) {
	e := newEnv(t)
	for i := range 10 {
		e.acquire(t, fmt.Sprintf("early%d", i), "p").Release()
	}
	e.clock.Advance(2 * time.Minute)
	for i := range 10_000 {
		e.acquire(t, fmt.Sprintf("late%d", i), "p").Release()
	}
	e.clock.Advance(3 * time.Minute)
	assert.Equal(t, 10, e.m.PopDue(e.clock.Now()), "only the 10 early sandboxes are due")
	// PopDue took them out of the heap; put the system back through a real tick.
	for i := range 10 {
		require.NoError(t, e.m.Remove(context.Background(), fmt.Sprintf("early%d", i), "p"))
	}
	before := e.p.Calls(fp.OpSetTimeout) + e.p.Calls(fp.OpKill)
	e.m.ReapNow()
	assert.Equal(t, before, e.p.Calls(fp.OpSetTimeout)+e.p.Calls(fp.OpKill), "nothing else due: no I/O")
	assert.EqualValues(t, 10_000, e.m.Stats().Active)
}

// A sandbox that vanished at the provider is dropped when the reaper
// touches it, and its quota reservation is released.
func TestReaperDropsVanished(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.MaxSandboxes = 1 })
	l := e.acquire(t, "u", "p")
	e.p.Vanish(l.Sandbox().ID)
	e.clock.Advance(4 * time.Minute) // inside the touch window
	e.m.ReapNow()
	assert.EqualValues(t, 0, e.m.Stats().Active)
	l.Release()
	e.acquire(t, "v", "p").Release() // quota was released
}

// A sandbox whose MaxAge passes while a fill is probing it is not handed
// out: the Acquire gets a new sandbox.
func TestMaxAgePassingDuringAProbeIsNotHandedOut(t *testing.T) {
	e := newEnv(t, func(cfg *sandboxpool.Config) { cfg.HealthCheckAfter = 30 * time.Second })
	old := e.acquire(t, "u", "p")
	id := old.Sandbox().ID
	old.Release()
	for range 7 { // used every 2 min, so its deadline keeps being pushed
		e.run(2 * time.Minute)
		e.acquire(t, "u", "p").Release()
	}
	held := e.acquire(t, "u", "p") // leased across MaxAge: the keepalive pushes its deadline past it
	defer held.Release()
	e.run(time.Minute - time.Second) // MaxAge is 1 s away; the probe is due
	checks := e.p.Calls(fp.OpCheck)
	e.p.SetLatency(fp.OpCheck, 300*time.Millisecond)
	advanced := make(chan struct{})
	go func() {
		defer close(advanced)
		for e.p.Calls(fp.OpCheck) == checks { // until the probe has started
			time.Sleep(time.Millisecond)
		}
		e.clock.Advance(2 * time.Second) // MaxAge passes during the probe
	}()
	l := e.acquire(t, "u", "p")
	defer l.Release()
	<-advanced
	assert.NotEqual(t, id, l.Sandbox().ID, "handed out past MaxAge")
	assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
	assert.EqualValues(t, 0, e.m.Stats().Replaced, "the old one was alive: it was retired, not replaced")
}

// A lease taken late in a sandbox's idle window, after the reaper's last
// visit before the deadline found it unleased, is still kept alive past
// that deadline: the Acquire itself pushes the deadline.
func TestLeaseTakenLateInTheIdleWindowIsKeptAlive(t *testing.T) {
	for _, probe := range []time.Duration{30 * time.Second, time.Hour} { // probed, and a pure memory hit
		t.Run(fmt.Sprint("HealthCheckAfter=", probe), func(t *testing.T) {
			e := newEnv(t, func(cfg *sandboxpool.Config) { cfg.HealthCheckAfter = probe })
			id := acquireID(t, e.m, "u", "p")
			e.run(4 * time.Minute) // the visit at 3m45s finds it unused: no push
			l := e.acquire(t, "u", "p")
			require.Equal(t, id, l.Sandbox().ID)
			for range 3 * 12 { // held for three more minutes, past its 5 min deadline
				e.run(reapTick)
				_, alive := e.p.Deadline(id)
				require.True(t, alive, "reaped under a lease at %v", e.clock.Now())
			}
			l.Release()
		})
	}
}

// A pair in use is pushed by the reaper before its memory hits would stop
// for the deadline, so a request arriving between that point and the next
// reaper tick is still a memory hit (no provider call on its path).
func TestPairInUseIsPushedBeforeItsHitsStop(t *testing.T) {
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		cfg.HealthCheckAfter, cfg.MaxAge = time.Hour, time.Hour
		cfg.ReapInterval = 30 * time.Second // the gap between ticks simulated below
	})
	e.acquire(t, "u", "p").Release() // created: deadline in 5 min, memory hits until 3m45s
	e.run(time.Minute)
	e.acquire(t, "u", "p").Release() // used at 1 min
	e.run(2*time.Minute + 20*time.Second)
	e.clock.Advance(30 * time.Second) // 3m50s, and no reaper tick since 3m20s
	before := e.m.Stats()
	e.acquire(t, "u", "p").Release()
	after := e.m.Stats()
	assert.Equal(t, before.MemoryHits+1, after.MemoryHits, "a memory hit")
	assert.Equal(t, before.Touches, after.Touches, "no deadline push on the request's path")
}

// The largest time.Duration, Go's usual "no limit", means no limit: a
// sandbox in use is kept past any age and served from memory without
// probes, and idleness still ends it. (Deadlines are unix-ns sums, which
// such a duration overflowed: the sandbox read as past its MaxAge at once,
// and every Acquire failed after creating three.)
func TestLongestDurationsMeanNoLimit(t *testing.T) {
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		cfg.MaxAge, cfg.HealthCheckAfter = math.MaxInt64, math.MaxInt64
	})
	first := e.acquire(t, "u", "p")
	id := first.Sandbox().ID
	first.Release()
	for range 60 { // an hour, four times the default MaxAge, used every minute
		e.run(time.Minute)
		l := e.acquire(t, "u", "p")
		require.Equal(t, id, l.Sandbox().ID)
		assert.Equal(t, sandboxpool.OutcomeMemoryHit, l.Outcome())
		l.Release()
		_, ok := e.p.Deadline(id)
		require.True(t, ok, "the provider must not reap a sandbox in use")
	}
	st := e.m.Stats()
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 0, st.HealthChecks, "never probed")
	assert.Greater(t, st.MemoryHits, int64(50), "served from memory: only a deadline push takes the slow path")
	assert.Positive(t, st.Touches, "the provider deadline was pushed")

	e.run(5*time.Minute + reapTick) // IdleTimeout without use
	assert.EqualValues(t, 0, e.m.Stats().Active)
	require.Eventually(t, func() bool { return len(e.p.Alive()) == 0 }, 5*time.Second, time.Millisecond)
}

// With the slowest tick New accepts (IdleTimeout/8), a sandbox held under
// one lease for half an hour is never reaped by its provider, whatever the
// tick's phase against the sandbox's deadlines. (New accepted any tick
// before, and with IdleTimeout 1m and a 30 s tick the provider ended a
// sandbox in use within 90 s: the keepalive visit, due 3/8 IdleTimeout
// before the deadline, waited for a tick that came after it.) So it is
// when every keepalive's first try fails: its retry comes in time.
func TestSlowestReapIntervalKeepsASandboxInUse(t *testing.T) {
	for _, idle := range []time.Duration{time.Second, time.Minute, 5 * time.Minute} {
		tick := idle / 8
		for phase := time.Duration(0); phase < tick; phase += tick / 4 {
			for _, failFirst := range []bool{false, true} {
				t.Run(fmt.Sprint(idle, "/", phase, "/failFirst=", failFirst), func(t *testing.T) {
					slowestTickKeepsALease(t, idle, tick, phase, failFirst)
				})
			}
		}
	}
}

func slowestTickKeepsALease(t *testing.T, idle, tick, phase time.Duration, failFirst bool) {
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		cfg.IdleTimeout, cfg.MaxAge, cfg.ReapInterval = idle, 2*time.Hour, tick
	})
	e.clock.Advance(phase)
	l := e.acquire(t, "u", "p")
	defer l.Release()
	id := l.Sandbox().ID
	queuedAt := int64(-1)
	for elapsed := time.Duration(0); elapsed < 30*time.Minute; elapsed += tick {
		// Every keepalive is a failed try, then one that holds: after an
		// even number of calls, fail the next keepalive's first try.
		if calls := e.p.Calls(fp.OpSetTimeout); failFirst && calls%2 == 0 && calls != queuedAt {
			e.p.FailNext(fp.OpSetTimeout, errors.New("fake: 503 Service Unavailable"))
			queuedAt = calls
		}
		e.clock.Advance(tick)
		e.m.ReapNow()
		_, alive := e.p.Deadline(id)
		require.True(t, alive, "reaped under a lease after %v", elapsed+tick)
	}
	if failFirst {
		calls := e.p.Calls(fp.OpSetTimeout)
		assert.GreaterOrEqual(t, calls, int64(4), "keepalives were tried, failed, and retried")
		assert.GreaterOrEqual(t, 2*e.m.Stats().TouchErrors, calls, "every keepalive's first try failed")
	}
}

// Each sandbox's lifecycle is logged at Debug, as its eviction always was,
// and counted in Stats: a line per sandbox at Info grows with the pool (a
// pool of 10,000 rotating at a 15-minute MaxAge would log 11 lines a second
// of "max age reached"), and after an E2B outage every pair's sandbox was
// found gone at Info. Nothing here is news for an operator: no line at
// Info or above.
func TestSandboxLifecycleIsLoggedAtDebug(t *testing.T) {
	var logs syncBuffer
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	const n = 20
	for i := range n { // leased throughout: kept alive, and past MaxAge retired at their release
		l := e.acquire(t, "u", fmt.Sprint("p", i))
		defer l.Release()
		if i%2 == 0 {
			e.p.Vanish(l.Sandbox().ID) // its next keepalive finds it gone
		}
	}
	e.run(10 * time.Minute) // past the first keepalives
	require.EqualValues(t, n/2, e.m.Stats().Active, "the vanished ones were found gone")
	e.run(6 * time.Minute) // past MaxAge (15 min)
	st := e.m.Stats()
	require.Zero(t, st.Active, "the others reached MaxAge")
	require.EqualValues(t, n/2, st.Evictions)
	assert.Empty(t, logs.String())
}
