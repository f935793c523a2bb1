package sandboxpool_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

var errUpstream = errors.New("upstream 503")

func TestAcquireReusesSandbox(t *testing.T) {
	e := newEnv(t)
	l1 := e.acquire(t, "alice", "p1")
	l1.Release()
	l2 := e.acquire(t, "alice", "p1")
	defer l2.Release()
	assert.Equal(t, l1.Sandbox().ID, l2.Sandbox().ID)
	assert.Equal(t, "alice", l2.Sandbox().User)
	assert.Equal(t, "p1", l2.Sandbox().Project)
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	st := e.m.Stats()
	assert.EqualValues(t, 2, st.Acquires)
	assert.EqualValues(t, 1, st.MemoryHits)
	assert.EqualValues(t, 1, st.Creates)
	assert.EqualValues(t, 1, st.Active)
	assert.EqualValues(t, 1, st.Leased)

	other := e.acquire(t, "alice", "p2")
	defer other.Release()
	assert.NotEqual(t, l1.Sandbox().ID, other.Sandbox().ID)
}

// 1,000 concurrent Acquires for one pair cause exactly one Create.
func TestSingleFlight1000(t *testing.T) {
	e := newEnv(t)
	e.p.SetLatency(fp.OpCreate, 50*time.Millisecond)
	const n = 1000
	ids := make([]string, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			l, err := e.m.Acquire(context.Background(), "u", "p")
			if !assert.NoError(t, err) {
				return
			}
			ids[i] = l.Sandbox().ID
			l.Release()
		})
	}
	close(start)
	wg.Wait()
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	for _, id := range ids {
		require.Equal(t, ids[0], id)
	}
	st := e.m.Stats()
	assert.EqualValues(t, 0, st.KeyLocks)
	assert.EqualValues(t, 0, st.Leased)
	assert.EqualValues(t, n, st.Acquires)
}

// Churning 100k distinct pairs leaves no per-pair lock entry behind, and
// Active tracks the pairs that are alive.
func TestChurn100kPairs(t *testing.T) {
	if testing.Short() {
		t.Skip("churn test skipped in -short mode")
	}
	e := newEnv(t)
	const pairs, workers = 100_000, 8
	run := func(fn func(i int)) {
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for i := w; i < pairs; i += workers {
					fn(i)
				}
			})
		}
		wg.Wait()
	}
	run(func(i int) {
		l, err := e.m.Acquire(context.Background(), fmt.Sprintf("user%d", i), "proj")
		if assert.NoError(t, err) {
			l.Release()
		}
	})
	st := e.m.Stats()
	assert.EqualValues(t, 0, st.KeyLocks)
	assert.EqualValues(t, pairs, st.Active)
	assert.Len(t, e.p.Alive(), pairs)

	run(func(i int) {
		if i%2 == 0 {
			assert.NoError(t, e.m.Remove(context.Background(), fmt.Sprintf("user%d", i), "proj"))
		}
	})
	st = e.m.Stats()
	assert.EqualValues(t, 0, st.KeyLocks)
	assert.EqualValues(t, pairs/2, st.Active)
	assert.Len(t, e.p.Alive(), pairs/2)
	assert.Equal(t, pairs/2, e.m.Scheduled())

	// The rest leave by idleness.
	e.clock.Advance(6 * time.Minute)
	e.m.ReapNow()
	assert.Eventually(t, func() bool { return len(e.p.Alive()) == 0 }, 10*time.Second, 10*time.Millisecond)
	st = e.m.Stats()
	assert.EqualValues(t, 0, st.Active)
	assert.EqualValues(t, 0, st.KeyLocks)
	assert.Equal(t, 0, e.m.Scheduled())
}

func TestProbeSkippedWithinHealthCheckAfter(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.HealthCheckAfter = 30 * time.Second })
	e.acquire(t, "u", "p").Release()
	e.clock.Advance(29 * time.Second)
	e.acquire(t, "u", "p").Release()
	assert.EqualValues(t, 0, e.p.Calls(fp.OpCheck))
	e.clock.Advance(2 * time.Second)
	e.acquire(t, "u", "p").Release()
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCheck))
	e.acquire(t, "u", "p").Release() // just probed: skipped again
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCheck))
	assert.EqualValues(t, 1, e.m.Stats().HealthChecks)
}

func TestAlwaysProbe(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.HealthCheckAfter = -1 })
	for range 3 {
		e.acquire(t, "u", "p").Release()
	}
	assert.EqualValues(t, 2, e.p.Calls(fp.OpCheck))
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
}

func TestDefinitiveNotFoundReplaces(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	old := l.Sandbox().ID
	l.Release()
	e.p.Vanish(old)
	e.clock.Advance(time.Minute) // past HealthCheckAfter
	l = e.acquire(t, "u", "p")
	defer l.Release()
	assert.NotEqual(t, old, l.Sandbox().ID)
	assert.EqualValues(t, 2, e.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 1, e.m.Stats().Replaced)
}

// Timeouts, 5xx, 429 and auth errors are returned and never replace.
func TestAmbiguousErrorsNeverReplace(t *testing.T) {
	for _, failure := range []error{errUpstream, context.DeadlineExceeded, errors.New("401 unauthorized")} {
		t.Run(failure.Error(), func(t *testing.T) {
			e := newEnv(t)
			l := e.acquire(t, "u", "p")
			id := l.Sandbox().ID
			l.Release()
			e.clock.Advance(time.Minute)
			e.p.FailNext(fp.OpCheck, failure)
			_, err := e.m.Acquire(context.Background(), "u", "p")
			require.ErrorIs(t, err, failure)
			assert.Contains(t, err.Error(), "u/p")
			assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
			l = e.acquire(t, "u", "p")
			defer l.Release()
			assert.Equal(t, id, l.Sandbox().ID)
			assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
		})
	}
}

// A failed create is returned to every waiter and not cached.
func TestCreateErrorSharedAndNotCached(t *testing.T) {
	e := newEnv(t)
	e.p.FailNext(fp.OpCreate, errUpstream)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, errUpstream)
	assert.EqualValues(t, 1, e.m.Stats().CreateErrors)
	l := e.acquire(t, "u", "p")
	l.Release()
	assert.EqualValues(t, 2, e.p.Calls(fp.OpCreate))
}

// A listing failure before create is returned: creating blind could duplicate.
func TestListFailureFailsClosed(t *testing.T) {
	e := newEnv(t)
	e.p.FailNext(fp.OpList, errUpstream)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, errUpstream)
	assert.EqualValues(t, 0, e.p.Calls(fp.OpCreate))
}

// The caller's cancellation does not abandon a started create: the result is
// parked and the next Acquire gets it without a second Create.
func TestCancelledCallerParksCreate(t *testing.T) {
	e := newEnv(t)
	e.p.SetLatency(fp.OpCreate, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := e.m.Acquire(ctx, "u", "p")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Eventually(t, func() bool { return e.m.Stats().Active == 1 }, 5*time.Second, 5*time.Millisecond)
	l := e.acquire(t, "u", "p")
	defer l.Release()
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 0, e.m.Stats().KeyLocks)
}

// A caller whose context has already ended gets its error and nothing
// else, as from database/sql and pgxpool: no create is started on its
// behalf (the request is gone, and the sandbox would cost money until its
// idle timeout), and a pooled pair is not leased to it either.
func TestAcquireWithEndedContextStartsNothing(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := e.m.Acquire(ctx, "u", "new")
	require.ErrorIs(t, err, context.Canceled)
	called := false
	err = e.m.Use(ctx, "u", "new", func(sandboxpool.Sandbox) error { called = true; return nil })
	require.ErrorIs(t, err, context.Canceled)
	assert.False(t, called, "Use ran fn for an ended context")

	e.acquire(t, "u", "pooled").Release()
	hits := e.m.Stats().MemoryHits
	_, err = e.m.Acquire(ctx, "u", "pooled")
	require.ErrorIs(t, err, context.Canceled)

	require.NoError(t, e.m.Close(context.Background())) // waits for any fill started
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate), "creates: only the pooled pair's")
	assert.Equal(t, hits, e.m.Stats().MemoryHits, "a memory hit was served to an ended context")
	assert.Zero(t, e.m.Stats().Leased)
}

// A new Manager adopts the pair's sandbox left by an earlier process instead
// of creating a second one (found by metadata).
func TestAdoptAfterRestart(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	l.Release()

	cfg := sandboxpool.Config{Provider: e.p}
	sandboxpool.SetClock(&cfg, e.clock.Now)
	sandboxpool.ManualReaper(&cfg)
	m2, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	defer m2.Close(context.Background())
	l2, err := m2.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l2.Release()
	assert.Equal(t, id, l2.Sandbox().ID)
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 1, m2.Stats().Adopted)

	// Another namespace does not adopt it.
	cfg.Namespace = "other"
	m3, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	defer m3.Close(context.Background())
	l3, err := m3.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l3.Release()
	assert.NotEqual(t, id, l3.Sandbox().ID)
}

// Among several sandboxes of the pair left by earlier processes, a Manager
// without Redis adopts the newest, kills the other ones young enough to be
// handed out (leftovers of an earlier process, with nobody to share them),
// and leaves one past MaxAge to its provider deadline (it may still be
// leased). A reconnect that fails ambiguously creates nothing and adopts
// nothing (fail closed); one that finds the newest gone adopts the next.
func TestAdoptsTheNewestLeftoverAndKillsTheOthers(t *testing.T) {
	e := newEnv(t)
	meta := map[string]string{sandboxpool.MetaNamespace: "sandboxpool", sandboxpool.MetaUser: "u", sandboxpool.MetaProject: "p"}
	leave := func(age time.Duration) string { // a sandbox of the pair made age ago
		t.Helper()
		sb, err := e.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: time.Hour, Metadata: meta})
		require.NoError(t, err)
		e.clock.Advance(age)
		return sb.ID
	}
	expired := leave(10 * time.Minute) // 16 minutes old: past MaxAge
	older := leave(5 * time.Minute)
	newer := leave(30 * time.Second)
	leave(30 * time.Second) // the newest, which the provider will report gone

	blip := errors.New("fake: 503 Service Unavailable")
	e.p.FailNext(fp.OpConnect, blip)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, blip)
	assert.Empty(t, e.p.Killed(), "an ambiguous answer killed something")

	e.p.FailNext(fp.OpConnect, fmt.Errorf("fake: %w", sandboxpool.ErrSandboxNotFound))
	l := e.acquire(t, "u", "p")
	defer l.Release()
	assert.Equal(t, newer, l.Sandbox().ID, "the newest that answers")
	assert.EqualValues(t, 3, e.p.Calls(fp.OpConnect), "failed, gone, adopted")
	assert.Equal(t, sandboxpool.OutcomeCacheHit, l.Outcome())
	assert.Equal(t, []string{older}, e.p.Killed())
	assert.Contains(t, e.p.Alive(), expired, "one past MaxAge is left to its deadline")
	assert.EqualValues(t, 4, e.p.Calls(fp.OpCreate), "the test's own four: the Manager created none")
}

// A leftover sandbox that the provider says was made in the future (its
// clock ahead of this instance's) is timed from now when adopted: it is
// not handed out past now+MaxAge.
func TestAdoptedSandboxFromTheFutureKeepsMaxAge(t *testing.T) {
	e := newEnv(t)
	e.p.Now = func() time.Time { return e.clock.Now().AddDate(1, 0, 0) }
	sb, err := e.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: time.Hour,
		Metadata: map[string]string{sandboxpool.MetaNamespace: "sandboxpool", sandboxpool.MetaUser: "u", sandboxpool.MetaProject: "p"}})
	require.NoError(t, err)
	e.p.Now = e.clock.Now
	l := e.acquire(t, "u", "p")
	require.Equal(t, sb.ID, l.Sandbox().ID, "adopted")
	l.Release()
	for range 31 { // 15 min 30 s of use every 30 s: past MaxAge
		e.run(30 * time.Second)
		e.acquire(t, "u", "p").Release()
	}
	l = e.acquire(t, "u", "p")
	defer l.Release()
	assert.NotEqual(t, sb.ID, l.Sandbox().ID, "handed out past MaxAge")
}

func TestRemove(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	require.NoError(t, e.m.Remove(context.Background(), "u", "p"))
	assert.Contains(t, e.p.Killed(), id)
	l.Release() // harmless after Remove
	l.Release()
	st := e.m.Stats()
	assert.EqualValues(t, 0, st.Active)
	assert.EqualValues(t, 0, st.Leased)
	l2 := e.acquire(t, "u", "p")
	defer l2.Release()
	assert.NotEqual(t, id, l2.Sandbox().ID)
	require.NoError(t, e.m.Remove(context.Background(), "nobody", "p"))
	require.ErrorIs(t, e.m.Remove(context.Background(), "bad:user", "p"), sandboxpool.ErrInvalidID)
}

// A Remove the provider fails (its kill, or its listing of the pair's
// other sandboxes) returns that error, and a retry finishes it: the
// sandbox left running is found by metadata and killed. A failed kill of
// the pooled sandbox is tried again once, when the listing finds it: if
// that kill holds, Remove succeeds (before, it returned the first error
// with the sandbox killed).
func TestRemoveThatFailsIsFinishedByARetry(t *testing.T) {
	e := newEnv(t)
	blip := errors.New("fake: 503 Service Unavailable")
	acquire := func() string {
		l := e.acquire(t, "u", "p")
		defer l.Release()
		return l.Sandbox().ID
	}

	id := acquire()
	e.p.FailNext(fp.OpKill, blip)
	require.NoError(t, e.m.Remove(context.Background(), "u", "p"), "the second try of the kill held")
	assert.Equal(t, []string{id}, e.p.Killed())
	assert.EqualValues(t, 2, e.p.Calls(fp.OpKill))

	for _, op := range []fp.Op{fp.OpKill, fp.OpList} {
		id := acquire()
		if op == fp.OpKill {
			e.p.FailNext(op, blip, blip)
		} else {
			e.p.FailNext(op, blip)
		}
		err := e.m.Remove(context.Background(), "u", "p")
		require.ErrorIs(t, err, blip, op)
		assert.Equal(t, 1, strings.Count(err.Error(), blip.Error()), "one error per failure left: %v", err)
		assert.EqualValues(t, 0, e.m.Stats().Active, op)
		require.NoError(t, e.m.Remove(context.Background(), "u", "p"), op)
		assert.Empty(t, e.p.Alive(), op)
		assert.Contains(t, e.p.Killed(), id, op)
	}
}

// Remove waits for an Acquire of the pair in flight, then removes what it
// made: a create that finished just after Remove looked would otherwise
// leave the pair a sandbox Remove never saw. A Remove whose ctx ends while
// it waits returns its error and changes nothing.
func TestRemoveWaitsForAnAcquireInFlight(t *testing.T) {
	e := newEnv(t)
	e.p.SetLatency(fp.OpCreate, 300*time.Millisecond)
	acquired := make(chan string, 1)
	go func() {
		l, err := e.m.Acquire(context.Background(), "u", "p")
		if err != nil {
			acquired <- err.Error()
			return
		}
		acquired <- l.Sandbox().ID
		l.Release()
	}()
	require.Eventually(t, func() bool { return e.p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, e.m.Remove(ctx, "u", "p"), context.DeadlineExceeded, "its ctx ended while it waited")
	assert.EqualValues(t, 0, e.p.Calls(fp.OpKill), "a Remove cut short killed something")

	require.NoError(t, e.m.Remove(context.Background(), "u", "p"))
	killed := e.p.Killed()
	require.Len(t, killed, 1, "the sandbox the Acquire in flight made outlived the Remove")
	// The Acquire leased the sandbox before the Remove (which killed it
	// all the same), or found it removed and made a new one.
	if got := <-acquired; got != killed[0] {
		assert.Equal(t, []string{got}, e.p.Alive())
	}
	require.Eventually(t, func() bool { return e.m.Stats().KeyLocks == 0 }, 5*time.Second, time.Millisecond, "a flight reference was kept")
}

// Remove with a context that has already ended changes nothing: before, it
// took the pair out of memory, failed to kill its sandbox, and left Redis
// naming a sandbox this instance had let go.
func TestRemoveWithEndedContextChangesNothing(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	l.Release()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, e.m.Remove(ctx, "u", "p"), context.Canceled)
	require.ErrorIs(t, e.m.Remove(ctx, "bad:user", "p"), context.Canceled, "an ended context wins, as in Acquire")
	_, err := e.m.Acquire(ctx, "bad:user", "p")
	require.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, e.p.Killed())
	assert.EqualValues(t, 0, e.p.Calls(fp.OpKill))
	assert.EqualValues(t, 1, e.m.Stats().Active, "the pair left the pool")
	l2 := e.acquire(t, "u", "p")
	defer l2.Release()
	assert.Equal(t, sandboxpool.OutcomeMemoryHit, l2.Outcome())
}

func TestReleaseOfANilLeaseIsANoOp(t *testing.T) {
	e := newEnv(t)
	l, err := e.m.Acquire(context.Background(), "bad:user", "p")
	require.ErrorIs(t, err, sandboxpool.ErrInvalidID)
	require.Nil(t, l)
	assert.NotPanics(t, l.Release)
}

func TestReleaseIdempotent(t *testing.T) {
	e := newEnv(t)
	l := e.acquire(t, "u", "p")
	l2 := e.acquire(t, "u", "p")
	l.Release()
	l.Release()
	assert.EqualValues(t, 1, e.m.Stats().Leased)
	l2.Release()
	assert.EqualValues(t, 0, e.m.Stats().Leased)
}

// TestLeasesAreNeverReused holds every Lease handed out: all are distinct
// (Leases are never recycled), so a late second Release can only ever end its
// own lease, and the lease count never goes below what is held.
func TestLeasesAreNeverReused(t *testing.T) {
	e := newEnv(t)
	seen := map[*sandboxpool.Lease]bool{}
	var held []*sandboxpool.Lease
	for i := range 500 {
		l := e.acquire(t, "u", "p")
		require.False(t, seen[l], "Lease %p handed out twice", l)
		seen[l] = true
		held = append(held, l)
		if i%3 == 0 { // release some early, twice, while others stay held
			l.Release()
			l.Release()
		}
	}
	var want int64
	for i := range held {
		if i%3 != 0 {
			want++
		}
	}
	assert.EqualValues(t, want, e.m.Stats().Leased)
	for _, l := range held {
		l.Release()
		l.Release()
	}
	assert.EqualValues(t, 0, e.m.Stats().Leased)
}

// TestMemoryHitAllocations: a memory hit allocates nothing, through Use and
// through Acquire+Release alike. Acquire is inlined into its caller, so a
// Lease that does not escape lives on the caller's stack; this test fails if
// Acquire grows past the inlining budget.
func TestMemoryHitAllocations(t *testing.T) {
	e := newEnv(t)
	e.acquire(t, "u", "p").Release() // create it; every Acquire below is a memory hit
	ctx := context.Background()
	hitsBefore := e.m.Stats().MemoryHits
	assert.Zero(t, testing.AllocsPerRun(1000, func() {
		l, err := e.m.Acquire(ctx, "u", "p")
		if err != nil {
			t.Fatal(err)
		}
		_ = l.Sandbox().ID
		l.Release()
	}), "allocations per Acquire+Release")
	assert.Zero(t, testing.AllocsPerRun(1000, func() {
		_ = e.m.Use(ctx, "u", "p", func(sandboxpool.Sandbox) error { return nil })
	}), "allocations per Use")
	assert.EqualValues(t, 2002, e.m.Stats().MemoryHits-hitsBefore, "every call was a memory hit")
}

// A pooled pair keeps none of its caller's memory: ids sliced from a large
// buffer (a request body) do not keep that buffer alive once the caller is
// done, while the pair stays pooled.
func TestPoolKeepsNoCallerMemory(t *testing.T) {
	e := newEnv(t)
	freed := make(chan struct{})
	func() {
		body := strings.Repeat("x", 1<<20) + "alice" + "p1"
		runtime.AddCleanup(unsafe.StringData(body), func(ch chan struct{}) { close(ch) }, freed)
		user, project := body[1<<20:1<<20+5], body[1<<20+5:]
		l := e.acquire(t, user, project)
		assert.Equal(t, "alice", l.Sandbox().User)
		l.Release()
	}()
	for deadline := time.Now().Add(10 * time.Second); ; {
		runtime.GC()
		select {
		case <-freed:
			l := e.acquire(t, "alice", "p1")
			defer l.Release()
			assert.Equal(t, sandboxpool.OutcomeMemoryHit, l.Outcome(), "the pair is still pooled")
			assert.Equal(t, "alice", l.Sandbox().User)
			assert.Equal(t, "p1", l.Sandbox().Project)
			return
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("the buffer the ids were sliced from is still reachable after the caller released them")
		}
	}
}

func TestInvalidIDsTouchNothing(t *testing.T) {
	e := newEnv(t)
	for _, tc := range [][2]string{{"", "p"}, {"u", ""}, {"a:b", "p"}, {"u", "{p}"}, {"u*", "p"}, {"u p", "p"}, {"-u", "p"}} {
		_, err := e.m.Acquire(context.Background(), tc[0], tc[1])
		require.ErrorIs(t, err, sandboxpool.ErrInvalidID, "%q", tc)
		var ve *sandboxpool.ValidationError
		require.ErrorAs(t, err, &ve)
	}
	for _, op := range []fp.Op{fp.OpCreate, fp.OpList, fp.OpCheck, fp.OpConnect, fp.OpKill, fp.OpSetTimeout} {
		assert.EqualValues(t, 0, e.p.Calls(op), op)
	}
	assert.EqualValues(t, 0, e.m.Stats().Acquires)
}

func TestClose(t *testing.T) {
	p := fp.New()
	m, err := sandboxpool.New(sandboxpool.Config{Provider: p})
	require.NoError(t, err)
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	require.NoError(t, m.Close(context.Background()))
	require.NoError(t, m.Close(context.Background()))
	_, err = m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrClosed)
	require.ErrorIs(t, m.Remove(context.Background(), "u", "p"), sandboxpool.ErrClosed)
	l.Release() // safe after Close
	assert.Len(t, p.Alive(), 1, "Close leaves sandboxes for the next process")
}

// Close waits for a create in flight, and cancels it when its ctx ends.
func TestCloseWaitsForFill(t *testing.T) {
	p := fp.New()
	p.SetLatency(fp.OpCreate, time.Hour)
	m, err := sandboxpool.New(sandboxpool.Config{Provider: p})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = m.Acquire(ctx, "u", "p")
	require.Error(t, err)
	cctx, ccancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer ccancel()
	require.ErrorIs(t, m.Close(cctx), context.DeadlineExceeded)
}

// An Acquire still waiting when Close gives up on background work learns
// that the Manager closed, not only that something was cancelled: a
// handler can answer "shutting down" rather than an internal error.
func TestAcquireCutShortByCloseReturnsErrClosed(t *testing.T) {
	p := fp.New()
	p.SetLatency(fp.OpCreate, time.Hour)
	m, err := sandboxpool.New(sandboxpool.Config{Provider: p})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := m.Acquire(context.Background(), "u", "p")
		done <- err
	}()
	require.Eventually(t, func() bool { return p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)
	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, m.Close(cctx), context.DeadlineExceeded)
	err = <-done
	require.ErrorIs(t, err, sandboxpool.ErrClosed)
	assert.ErrorIs(t, err, context.Canceled, "the cause stays readable")
}

// Close waits for a Remove in flight (see TestCloseWaitsForARemoveInFlight
// for why), and a Close whose ctx ends first cuts it: the Remove learns
// that the Manager closed, as a cut Acquire does, with the cause readable.
func TestRemoveCutShortByCloseReturnsErrClosed(t *testing.T) {
	p := fp.New()
	kills := &endedKills{Provider: p}
	m, err := sandboxpool.New(sandboxpool.Config{Provider: kills})
	require.NoError(t, err)
	acquireID(t, m, "u", "p")
	p.SetLatency(fp.OpKill, time.Hour)
	done := make(chan error, 1)
	go func() { done <- m.Remove(context.Background(), "u", "p") }()
	require.Eventually(t, func() bool { return p.Calls(fp.OpKill) == 1 }, 5*time.Second, time.Millisecond)
	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, m.Close(cctx), context.DeadlineExceeded)
	require.EqualValues(t, 1, kills.n.Load(), "Close returned before the Remove it cut")
	err = <-done
	require.ErrorIs(t, err, sandboxpool.ErrClosed)
	assert.ErrorIs(t, err, context.Canceled, "the cause stays readable")
	require.ErrorIs(t, m.Remove(context.Background(), "u", "p"), sandboxpool.ErrClosed)
}

// gatedCreates holds each Create until gate is closed (or its ctx ends),
// and records that one finished.
type gatedCreates struct {
	sandboxpool.Provider
	gate              chan struct{}
	entered, finished atomic.Bool
}

func (p *gatedCreates) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	p.entered.Store(true)
	select {
	case <-p.gate:
	case <-ctx.Done():
		return sandboxpool.Sandbox{}, ctx.Err()
	}
	sb, err := p.Provider.Create(ctx, req)
	p.finished.Store(true)
	return sb, err
}

// closing reports whether Close has begun on m, starting nothing: an
// Acquire with an ended context returns ErrClosed once m is closed, and
// the context's error before.
func closing(m *sandboxpool.Manager) bool {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := m.Acquire(ctx, "u", "p")
	return errors.Is(err, sandboxpool.ErrClosed)
}

// closingWithFillInFlight starts an Acquire whose create p holds at its
// gate, then a first Close of m with no deadline, and returns once that
// Close has begun. acquired and first receive their errors.
func closingWithFillInFlight(t *testing.T) (m *sandboxpool.Manager, p *gatedCreates, acquired, first chan error) {
	p = &gatedCreates{Provider: fp.New(), gate: make(chan struct{})}
	m, err := sandboxpool.New(sandboxpool.Config{Provider: p})
	require.NoError(t, err)
	acquired, first = make(chan error, 1), make(chan error, 1)
	go func() {
		l, err := m.Acquire(context.Background(), "u", "p")
		l.Release()
		acquired <- err
	}()
	require.Eventually(t, p.entered.Load, 5*time.Second, time.Millisecond)
	go func() { first <- m.Close(context.Background()) }()
	require.Eventually(t, func() bool { return closing(m) }, 5*time.Second, time.Millisecond, "the first Close has begun")
	return m, p, acquired, first
}

// Close called again while the first Close waits (a signal handler and a
// deferred Close, say) returns only once background work has stopped, as
// the first does; not at once, with a fill still running.
func TestSecondCloseWaitsForBackgroundWork(t *testing.T) {
	m, p, acquired, first := closingWithFillInFlight(t)
	time.AfterFunc(50*time.Millisecond, func() { close(p.gate) })
	require.NoError(t, m.Close(context.Background()))
	assert.True(t, p.finished.Load(), "the second Close returned while the fill still ran")
	require.NoError(t, <-first)
	require.NoError(t, <-acquired, "a fill that ran to its end is handed out")
}

// A later Close whose ctx ends first cuts background work short, as the
// first would: its error says so, and the waiting Acquire learns that the
// Manager closed.
func TestSecondCloseCutsBackgroundWorkShort(t *testing.T) {
	m, p, acquired, first := closingWithFillInFlight(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, m.Close(ctx), context.DeadlineExceeded)
	require.ErrorIs(t, <-acquired, sandboxpool.ErrClosed)
	require.NoError(t, <-first, "the first Close's own ctx did not end")
	assert.False(t, p.finished.Load())
}

func TestDefaultBuiltOnce(t *testing.T) {
	var builds int
	var mu sync.Mutex
	built := &sandboxpool.Manager{}
	restore := sandboxpool.SetDefaultBuilder(func() (*sandboxpool.Manager, error) {
		mu.Lock()
		builds++
		mu.Unlock()
		time.Sleep(10 * time.Millisecond) // widen the race window
		return built, nil
	})
	defer restore()
	var wg sync.WaitGroup
	got := make([]*sandboxpool.Manager, 100)
	for i := range got {
		wg.Go(func() {
			m, err := sandboxpool.Default()
			assert.NoError(t, err)
			got[i] = m
		})
	}
	wg.Wait()
	assert.Equal(t, 1, builds)
	for _, m := range got {
		assert.Same(t, built, m)
	}
}

func TestDefaultErrorIsShared(t *testing.T) {
	restore := sandboxpool.SetDefaultBuilder(func() (*sandboxpool.Manager, error) { return nil, errUpstream })
	defer restore()
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() {
			_, err := sandboxpool.Default()
			assert.ErrorIs(t, err, errUpstream)
		})
	}
	wg.Wait()
}

// A build that panics panics again at every call: sync.Once alone would
// count it as done and hand later callers a nil Manager with no error.
func TestDefaultBuildPanicIsNeverANilManager(t *testing.T) {
	restore := sandboxpool.SetDefaultBuilder(func() (*sandboxpool.Manager, error) { panic("build failed") })
	defer restore()
	for range 2 {
		require.PanicsWithValue(t, "build failed", func() {
			m, err := sandboxpool.Default()
			t.Errorf("Default returned %v, %v after its build panicked", m, err)
		})
	}
}

// Default builds its Manager from the environment, once: a malformed
// variable is the error of every call, and a good environment gives every
// call one Manager, here on the E2B provider against the fake.
func TestDefaultIsBuiltFromTheEnvironment(t *testing.T) {
	srv := e2btest.Start(e2btest.Config{})
	t.Cleanup(srv.Close)
	t.Setenv(sandboxpool.EnvRedisURL, "")
	t.Setenv(sandboxpool.EnvE2BAPIKey, e2btest.APIKey)
	t.Setenv(sandboxpool.EnvE2BAPIURL, srv.URL)
	t.Setenv(sandboxpool.EnvE2BSandboxURL, srv.EnvdURL)
	t.Setenv(sandboxpool.EnvMaxAge, "two hours")

	restore := sandboxpool.ResetDefault()
	defer restore()
	for range 2 {
		m, err := sandboxpool.Default()
		require.ErrorContains(t, err, sandboxpool.EnvMaxAge)
		assert.Nil(t, m)
	}

	t.Setenv(sandboxpool.EnvMaxAge, "2h")
	sandboxpool.ResetDefault()
	m, err := sandboxpool.Default()
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) }) // repeatable: closed here too if the test stops early
	again, err := sandboxpool.Default()
	require.NoError(t, err)
	assert.Same(t, m, again)
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	assert.Equal(t, []string{l.Sandbox().ID}, srv.Running(), "created through the E2B the environment names")
	l.Release()
	require.NoError(t, m.Close(context.Background()))
	_, err = m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrClosed)
}

func TestQuotas(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.MaxSandboxes = 3; c.MaxPerUser = 2 })
	e.acquire(t, "a", "1").Release()
	e.acquire(t, "a", "2").Release()
	_, err := e.m.Acquire(context.Background(), "a", "3")
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
	e.acquire(t, "a", "1").Release() // reuse is never refused
	e.acquire(t, "b", "1").Release()
	_, err = e.m.Acquire(context.Background(), "c", "1")
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
	assert.EqualValues(t, 2, e.m.Stats().QuotaRejected)
	require.NoError(t, e.m.Remove(context.Background(), "a", "1"))
	e.acquire(t, "c", "1").Release() // a slot was freed
	assert.EqualValues(t, 4, e.p.Calls(fp.OpCreate))
}

// skewedCreates answers every create with a creation time off by skew, as
// a provider whose clock disagrees with the Manager's would.
type skewedCreates struct {
	*fp.Provider
	skew time.Duration
}

func (p skewedCreates) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	sb, err := p.Provider.Create(ctx, req)
	sb.CreatedAt = sb.CreatedAt.Add(p.skew)
	return sb, err
}

// A sandbox the Manager creates is timed from the Manager's clock: a
// provider whose clock is behind by more than MaxAge made every new
// sandbox look past MaxAge at birth, so each Acquire created three and
// failed; one ahead kept its sandboxes past MaxAge by its lead.
func TestCreatedSandboxIsTimedByTheManagersClock(t *testing.T) {
	for _, skew := range []time.Duration{-time.Hour, time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			e := newEnv(t, func(cfg *sandboxpool.Config) { cfg.Provider = skewedCreates{cfg.Provider.(*fp.Provider), skew} })
			held := e.acquire(t, "u", "p") // in use throughout: kept alive, never idle
			defer held.Release()
			assert.Equal(t, sandboxpool.OutcomeCreated, held.Outcome())
			assert.Equal(t, e.clock.Now(), held.Sandbox().CreatedAt)
			id := held.Sandbox().ID
			e.run(14 * time.Minute)
			assert.Equal(t, id, acquireID(t, e.m, "u", "p"), "handed out until MaxAge")
			e.run(time.Minute + reapTick)
			assert.NotEqual(t, id, acquireID(t, e.m, "u", "p"), "and not after")
			assert.EqualValues(t, 2, e.p.Calls(fp.OpCreate))
		})
	}
}

// A pair at MaxAge gets its new sandbox even when the quotas are full:
// the new one takes the old one's place, since it replaces it. Before, the
// old one kept its place until it was killed (in the background) or, if
// leased, until its last release, and the pair's Acquire failed with
// ErrQuotaExceeded meanwhile: at every rotation of a pool at its cap.
func TestMaxAgeRotationAtTheQuotaCap(t *testing.T) {
	for _, leased := range []bool{false, true} {
		t.Run(fmt.Sprint("old sandbox leased: ", leased), func(t *testing.T) {
			e := newEnv(t, func(c *sandboxpool.Config) { c.MaxSandboxes = 2; c.MaxPerUser = 1 })
			e.p.SetLatency(fp.OpKill, 200*time.Millisecond) // the old sandbox's end is not instant
			old := e.acquire(t, "a", "1")
			e.acquire(t, "b", "1").Release()
			if !leased {
				old.Release()
			}
			e.clock.Advance(15 * time.Minute)
			next := e.acquire(t, "a", "1")
			assert.NotEqual(t, old.Sandbox().ID, next.Sandbox().ID)
			assert.Equal(t, sandboxpool.OutcomeCreated, next.Outcome())
			next.Release()
			old.Release()

			_, err := e.m.Acquire(context.Background(), "c", "1")
			require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "the quotas still hold")
			_, err = e.m.Acquire(context.Background(), "a", "2")
			require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
			require.Eventually(t, func() bool { return e.p.Calls(fp.OpKill) == 1 && e.m.Stats().Active == 2 }, 5*time.Second, time.Millisecond,
				"the old sandbox is ended")
			_, err = e.m.Acquire(context.Background(), "c", "1")
			require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "and its end frees no place the new one holds")
		})
	}
}

func TestCreateRateLimit(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) {
		c.CreateLimit = sandboxpool.RateLimit{Rate: 1, Burst: 2, Per: time.Minute}
	})
	e.acquire(t, "a", "1").Release()
	e.acquire(t, "a", "2").Release()
	_, err := e.m.Acquire(context.Background(), "a", "3")
	require.ErrorIs(t, err, sandboxpool.ErrRateLimited)
	ra, ok := sandboxpool.RetryAfter(err)
	require.True(t, ok)
	assert.Equal(t, time.Minute, ra)
	e.acquire(t, "a", "1").Release() // reuse is not limited
	e.acquire(t, "b", "1").Release() // other users are not limited
	e.clock.Advance(time.Minute)
	e.acquire(t, "a", "3").Release()
	assert.EqualValues(t, 1, e.m.Stats().RateLimited)
}

func TestUseLeasesForTheCall(t *testing.T) {
	e := newEnv(t)
	var first string
	require.NoError(t, e.m.Use(context.Background(), "u", "p", func(sb sandboxpool.Sandbox) error {
		first = sb.ID
		assert.EqualValues(t, 1, e.m.Stats().Leased)
		return nil
	}))
	assert.EqualValues(t, 0, e.m.Stats().Leased)
	err := e.m.Use(context.Background(), "u", "p", func(sb sandboxpool.Sandbox) error {
		assert.Equal(t, first, sb.ID, "memory hit")
		return errUpstream
	})
	require.ErrorIs(t, err, errUpstream)
	st := e.m.Stats()
	assert.EqualValues(t, 0, st.Leased)
	assert.EqualValues(t, 2, st.Acquires)
	assert.EqualValues(t, 1, st.MemoryHits)
	require.ErrorIs(t, e.m.Use(context.Background(), "u:", "p", func(sandboxpool.Sandbox) error { return nil }), sandboxpool.ErrInvalidID)
}

// An fn that reports its sandbox failing it (an error wrapping
// ErrSandboxNotFound or ErrSandboxUnresponsive) has it rechecked, as
// Lease.Recheck does: the next Acquire probes, and replaces a sandbox gone.
// Any other error of fn leaves memory hits alone.
func TestUseRechecksASandboxThatFailedFn(t *testing.T) {
	e := newEnv(t)
	id := acquireID(t, e.m, "u", "p")
	checks := e.p.Calls(fp.OpCheck)
	require.ErrorIs(t, e.m.Use(context.Background(), "u", "p", func(sandboxpool.Sandbox) error { return errUpstream }), errUpstream)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.Equal(t, checks, e.p.Calls(fp.OpCheck), "another error: a memory hit")

	for _, sentinel := range []error{sandboxpool.ErrSandboxUnresponsive, sandboxpool.ErrSandboxNotFound} {
		err := e.m.Use(context.Background(), "u", "p", func(sb sandboxpool.Sandbox) error {
			return fmt.Errorf("run in %s: %w", sb.ID, sentinel)
		})
		require.ErrorIs(t, err, sentinel)
		assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
		assert.Equal(t, checks+1, e.p.Calls(fp.OpCheck), "probed before the next hand-out")
		checks++
	}

	err := e.m.Use(context.Background(), "u", "p", func(sb sandboxpool.Sandbox) error {
		e.p.Vanish(sb.ID)
		return fmt.Errorf("envd of %s: %w", sb.ID, sandboxpool.ErrSandboxNotFound)
	})
	require.ErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.NotEqual(t, id, acquireID(t, e.m, "u", "p"), "replaced at once")
}

func TestLeaseOutcome(t *testing.T) {
	e := newEnv(t)
	var seen []string
	e2 := newEnv(t, func(c *sandboxpool.Config) {
		c.OnAcquire = func(o sandboxpool.Outcome, d time.Duration) { seen = append(seen, o.String()) }
	})
	_ = e
	l := e2.acquire(t, "u", "p")
	assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
	assert.False(t, l.Reused())
	l.Release()
	l = e2.acquire(t, "u", "p")
	assert.Equal(t, sandboxpool.OutcomeMemoryHit, l.Outcome())
	assert.True(t, l.Reused())
	l.Release()
	_, err := e2.m.Acquire(context.Background(), "u", "p:")
	require.Error(t, err)
	e2.p.FailNext(fp.OpList, errUpstream)
	_, err = e2.m.Acquire(context.Background(), "v", "p")
	require.Error(t, err)
	assert.Equal(t, []string{"created", "memory_hit", "error"}, seen, "invalid ids are not observed")
}

// An OnAcquire that panics panics the Acquire, whose caller never gets
// the Lease: the lease it took is released, on a create and on a memory
// hit, or the sandbox would be kept alive by its keepalive for as long as
// the process runs.
func TestOnAcquirePanicReleasesTheLease(t *testing.T) {
	var panicking atomic.Bool
	e := newEnv(t, func(c *sandboxpool.Config) {
		c.OnAcquire = func(sandboxpool.Outcome, time.Duration) {
			if panicking.Load() {
				panic("metrics broke")
			}
		}
	})
	acquirePanics := func() (l *sandboxpool.Lease, p any) {
		defer func() { p = recover() }()
		l, _ = e.m.Acquire(context.Background(), "u", "p")
		return l, nil
	}
	panicking.Store(true)
	for _, want := range []string{"created", "memory hit"} {
		l, p := acquirePanics()
		require.Nil(t, l, want)
		require.Equal(t, "metrics broke", p, want)
		st := e.m.Stats()
		assert.EqualValues(t, 0, st.Leased, "%s: the lease went with the panic", want)
		assert.EqualValues(t, 1, st.Active, want)
	}
	panicking.Store(false)
	assert.EqualValues(t, 1, e.m.Stats().Creates)
	e.acquire(t, "u", "p").Release()
	assert.EqualValues(t, 0, e.m.Stats().Leased)
}

// unfilteredList is a Provider whose List ignores the metadata filter, as
// an API that changed, or a proxy that dropped the query, would.
type unfilteredList struct{ sandboxpool.Provider }

func (p unfilteredList) List(ctx context.Context, _ map[string]string) ([]sandboxpool.Sandbox, error) {
	return p.Provider.List(ctx, nil)
}

// What a provider lists for a pair is adopted and handed to its user, and
// killed by Remove: a listed sandbox whose metadata names another pair is
// neither, whatever the provider's filter did.
func TestListedSandboxesOfAnotherPairAreIgnored(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.Provider = unfilteredList{c.Provider} })
	alice := acquireID(t, e.m, "alice", "p")
	bob := acquireID(t, e.m, "bob", "p")
	assert.NotEqual(t, alice, bob, "bob was not given alice's sandbox")
	assert.EqualValues(t, 0, e.m.Stats().Adopted)
	assert.EqualValues(t, 2, e.m.Stats().Creates)

	require.NoError(t, e.m.Remove(context.Background(), "bob", "p"))
	_, alive := e.p.Deadline(alice)
	assert.True(t, alive, "bob's Remove left alice's sandbox alone")
	_, alive = e.p.Deadline(bob)
	assert.False(t, alive)
	assert.Equal(t, alice, acquireID(t, e.m, "alice", "p"))
}

// A memory hit is counted in its sandbox's slot, not in a counter that
// every hit writes: the count must outlive the slot. Stats reports every
// hit after the sandbox is removed, and after it is replaced.
func TestMemoryHitsOutliveTheirSandbox(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for range 5 {
		e.acquire(t, "alice", "p1").Release()
	}
	e.acquire(t, "bob", "p1").Release()
	e.acquire(t, "bob", "p1").Release()
	assert.EqualValues(t, 5, e.m.Stats().MemoryHits, "4 hits on alice's, 1 on bob's")

	require.NoError(t, e.m.Remove(ctx, "alice", "p1"))
	st := e.m.Stats()
	assert.EqualValues(t, 5, st.MemoryHits, "alice's hits are kept after her sandbox is removed")
	assert.EqualValues(t, 7, st.Acquires)

	e.acquire(t, "alice", "p1").Release() // a new sandbox
	e.acquire(t, "alice", "p1").Release()
	assert.EqualValues(t, 6, e.m.Stats().MemoryHits)
}

// A holder whose sandbox failed it calls Recheck: the next Acquire probes
// the sandbox instead of trusting a recent check from memory, so a sandbox
// that died meanwhile is replaced at once rather than handed out until
// HealthCheckAfter. One that answers is handed out, and memory hits resume.
func TestRecheckProbesBeforeTheNextHandOut(t *testing.T) {
	for name, probeAfter := range map[string]time.Duration{"default HealthCheckAfter": 0, "probes never due": math.MaxInt64} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, func(c *sandboxpool.Config) { c.HealthCheckAfter = probeAfter })
			l := e.acquire(t, "u", "p")
			id := l.Sandbox().ID
			l.Recheck()
			l.Release()
			checks := e.p.Calls(fp.OpCheck)
			assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
			assert.Equal(t, checks+1, e.p.Calls(fp.OpCheck), "probed")
			assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
			assert.Equal(t, checks+1, e.p.Calls(fp.OpCheck), "memory hits again")

			l = e.acquire(t, "u", "p")
			e.p.Vanish(id)
			l.Recheck()
			l.Release()
			l.Recheck() // after Release: harmless
			l = e.acquire(t, "u", "p")
			defer l.Release()
			assert.NotEqual(t, id, l.Sandbox().ID, "replaced, not handed out dead")
			assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
			var nilLease *sandboxpool.Lease
			nilLease.Recheck()
		})
	}
}

// Rechecks racing Acquires, Releases and each other: every Acquire is
// served the pair's one sandbox, and each Recheck is followed by a probe.
func TestRecheckRacesAcquires(t *testing.T) {
	e := newEnv(t)
	id := acquireID(t, e.m, "u", "p")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range 200 {
				l, err := e.m.Acquire(context.Background(), "u", "p")
				if !assert.NoError(t, err) {
					return
				}
				assert.Equal(t, id, l.Sandbox().ID)
				if i%10 == 0 {
					l.Recheck()
				}
				l.Release()
			}
		})
	}
	wg.Wait()
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
	assert.Positive(t, e.p.Calls(fp.OpCheck))
	checks := e.p.Calls(fp.OpCheck)
	acquireID(t, e.m, "u", "p")
	assert.Equal(t, checks, e.p.Calls(fp.OpCheck), "the last Recheck was probed: memory hits again")
}
