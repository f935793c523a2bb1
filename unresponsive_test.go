package sandboxpool_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

// hungSandbox pools a sandbox for u/p, then hangs it and moves the clock
// past HealthCheckAfter, so the next Acquire probes it.
func hungSandbox(t *testing.T, e *env) string {
	t.Helper()
	l := e.acquire(t, "u", "p")
	id := l.Sandbox().ID
	l.Release()
	e.p.Hang(id)
	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	return id
}

// failsUnresponsive asserts that an Acquire of u/p fails with
// ErrSandboxUnresponsive, and that it probed the sandbox to learn it.
func failsUnresponsive(t *testing.T, e *env) error {
	t.Helper()
	checks := e.p.Calls(fp.OpCheck)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.Contains(t, err.Error(), "u/p")
	assert.Equal(t, checks+1, e.p.Calls(fp.OpCheck), "the Acquire probed the sandbox")
	return err
}

// A sandbox the provider reports running but which does not answer fails
// its pair's Acquires, and is probed at them (at most once every
// SuspectProbeEvery), until it has been unresponsive for
// UnresponsiveAfter; then it is killed and replaced. Before, it was kept
// and failed every Acquire of the pair until MaxAge, each with a probe.
func TestUnresponsiveSandboxIsReplacedAfterUnresponsiveAfter(t *testing.T) {
	e := newEnv(t)
	id := hungSandbox(t, e)

	failsUnresponsive(t, e)
	checks := e.p.Calls(fp.OpCheck)
	for range 10 {
		_, err := e.m.Acquire(context.Background(), "u", "p")
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	}
	assert.Equal(t, checks, e.p.Calls(fp.OpCheck), "Acquires within SuspectProbeEvery of the probe fail without one")
	e.clock.Advance(sandboxpool.SuspectProbeEvery)
	err := failsUnresponsive(t, e) // no memory hit for a suspect
	ra, ok := sandboxpool.RetryAfter(err)
	require.True(t, ok)
	assert.Equal(t, sandboxpool.DefaultUnresponsiveAfter-sandboxpool.SuspectProbeEvery, ra, "the error says when the sandbox is replaced")
	assert.Equal(t, 1, sandboxpool.Suspects(e.m))
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter - sandboxpool.SuspectProbeEvery - time.Second)
	failsUnresponsive(t, e)
	assert.Contains(t, e.p.Alive(), id, "kept until UnresponsiveAfter")
	assert.Empty(t, e.p.Killed())

	e.clock.Advance(time.Second)
	l := e.acquire(t, "u", "p")
	defer l.Release()
	assert.NotEqual(t, id, l.Sandbox().ID)
	assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
	assert.Equal(t, []string{id}, e.p.Killed(), "the hung sandbox is killed, not left running")
	assert.Equal(t, []string{l.Sandbox().ID}, e.p.Alive())
	st := e.m.Stats()
	assert.EqualValues(t, 1, st.Unresponsive)
	assert.EqualValues(t, 1, st.Replaced)
	assert.Equal(t, 0, sandboxpool.Suspects(e.m))

	// The replacement is served from memory again, without a probe.
	checks = e.p.Calls(fp.OpCheck)
	e.acquire(t, "u", "p").Release()
	assert.Equal(t, checks, e.p.Calls(fp.OpCheck))
}

// A probe that answers acquits a suspect: memory hits resume, and a later
// spell of unresponsiveness is timed from its own first failing probe.
func TestAnsweringProbeAcquitsASuspect(t *testing.T) {
	e := newEnv(t)
	id := hungSandbox(t, e)
	failsUnresponsive(t, e)
	e.p.Revive(id)
	e.clock.Advance(sandboxpool.SuspectProbeEvery)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.Equal(t, 0, sandboxpool.Suspects(e.m))
	checks := e.p.Calls(fp.OpCheck)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.Equal(t, checks, e.p.Calls(fp.OpCheck), "a memory hit again")

	e.p.Hang(id)
	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	failsUnresponsive(t, e)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter - time.Second)
	failsUnresponsive(t, e) // the first spell began over UnresponsiveAfter ago
	assert.Empty(t, e.p.Killed())
}

// Keepalives go through the provider's API, which answers for a hung
// sandbox: pushing the deadline, the reaper's or an Acquire's, does not
// stand in for the probe.
func TestKeepaliveDoesNotAcquitASuspect(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.UnresponsiveAfter = -1 })
	held := e.acquire(t, "u", "p") // in use throughout: the reaper keeps it alive
	defer held.Release()
	id := held.Sandbox().ID
	e.p.Hang(id)
	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	failsUnresponsive(t, e)

	touches := e.p.Calls(fp.OpSetTimeout)
	e.run(4 * time.Minute)
	require.Greater(t, e.p.Calls(fp.OpSetTimeout), touches, "the reaper pushed the deadline")
	failsUnresponsive(t, e)

	dl, ok := e.p.Deadline(id)
	require.True(t, ok)
	e.clock.Advance(dl.Sub(e.clock.Now()) - time.Minute) // within IdleTimeout/4 of it, with no reaper tick
	touches = e.p.Calls(fp.OpSetTimeout)
	failsUnresponsive(t, e)
	assert.Equal(t, touches+1, e.p.Calls(fp.OpSetTimeout), "the Acquire pushed the deadline, and probed all the same")
}

// UnresponsiveAfter -1 keeps a hung sandbox, failing its pair's Acquires,
// for as long as it lives.
func TestUnresponsiveAfterMinusOneNeverCondemns(t *testing.T) {
	e := newEnv(t, func(c *sandboxpool.Config) { c.UnresponsiveAfter = -1 })
	id := hungSandbox(t, e)
	failsUnresponsive(t, e)
	e.clock.Advance(4 * time.Minute) // 4×UnresponsiveAfter's default, within the sandbox's life
	_, hinted := sandboxpool.RetryAfter(failsUnresponsive(t, e))
	assert.False(t, hinted, "no replacement to wait for")
	assert.Empty(t, e.p.Killed())
	assert.Contains(t, e.p.Alive(), id)
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))
}

// A failed kill keeps the hung sandbox, and nothing is created while it may
// still run: the Acquire fails with both errors, and the next probe tries
// again.
func TestCondemnationWhoseKillFailsIsTriedAgain(t *testing.T) {
	e := newEnv(t)
	id := hungSandbox(t, e)
	failsUnresponsive(t, e)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)
	e.p.FailNext(fp.OpKill, errUpstream)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	require.ErrorIs(t, err, errUpstream)
	assert.Contains(t, e.p.Alive(), id)
	assert.EqualValues(t, 1, e.p.Calls(fp.OpCreate))

	e.clock.Advance(sandboxpool.SuspectProbeEvery)

	assert.NotEqual(t, id, acquireID(t, e.m, "u", "p"))
	assert.Equal(t, []string{id}, e.p.Killed())
	assert.EqualValues(t, 1, e.m.Stats().KillErrors)
}

// A suspect leaves the Manager's record when it leaves the pool, however it
// leaves: the record never outgrows the pool.
func TestSuspectsAreForgottenWithTheirSlots(t *testing.T) {
	e := newEnv(t)
	for i := range 3 {
		l := e.acquire(t, "u", string(rune('a'+i)))
		e.p.Hang(l.Sandbox().ID)
		l.Release()
	}
	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	for i := range 3 {
		_, err := e.m.Acquire(context.Background(), "u", string(rune('a'+i)))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	}
	require.Equal(t, 3, sandboxpool.Suspects(e.m))
	require.NoError(t, e.m.Remove(context.Background(), "u", "a"))
	assert.Equal(t, 2, sandboxpool.Suspects(e.m))
	e.run(5 * time.Minute) // idle eviction of the other two
	assert.Zero(t, e.m.Stats().Active)
	assert.Equal(t, 0, sandboxpool.Suspects(e.m))
}

// Over HTTP: E2B's envd proxy answers 502 for a sandbox its API reports
// running. The error matches both ErrSandboxUnresponsive and
// e2b.ErrUnreachable; after UnresponsiveAfter the sandbox is killed at E2B
// and replaced.
func TestE2BHungSandboxIsReplaced(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	id := acquireID(t, e.m, "u", "p")
	e.srv.Hang(id)
	e.clock.Advance(time.Minute)
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.Equal(t, []string{id}, e.srv.Running())

	e.clock.Advance(time.Minute)
	next := acquireID(t, e.m, "u", "p")
	assert.NotEqual(t, id, next)
	assert.Equal(t, []string{next}, e.srv.Running())
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpKill))
	assert.EqualValues(t, 2, e.srv.Calls(e2btest.OpCreate))
}

// Two instances hold the same hung sandbox and condemn it at once: it is
// killed, and both converge on one replacement.
func TestRedisHungSandboxIsReplacedOnce(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t)
		a, b, id := c.sharing(t)
		c.p.Hang(id)
		c.advance(sandboxpool.DefaultHealthCheckAfter)
		for _, m := range []*sandboxpool.Manager{a, b} {
			_, err := m.Acquire(context.Background(), "u", "p")
			require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
		}
		c.advance(sandboxpool.DefaultUnresponsiveAfter)
		var wg sync.WaitGroup
		ids := make([]string, 2)
		for i, m := range []*sandboxpool.Manager{a, b} {
			wg.Go(func() {
				l, err := m.Acquire(context.Background(), "u", "p")
				if assert.NoError(t, err) {
					ids[i] = l.Sandbox().ID
					l.Release()
				}
			})
		}
		wg.Wait()
		assert.NotEqual(t, id, ids[0])
		assert.Equal(t, ids[0], ids[1], "one replacement for both")
		assert.Equal(t, []string{ids[0]}, c.p.Alive())
		assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
		assert.Equal(t, ids[0], c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	})
}

// An instance that condemns a sandbox tells the others, as a Remove does:
// one that reconnected to it too recently to probe it would otherwise hand
// it out, killed, from memory until its next probe.
func TestRedisCondemnationIsAnnounced(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t)
		a, b := c.instance(t), c.instance(t)
		c.waitSubscribers(t, 2)
		id := acquireID(t, a, "u", "p")
		c.p.Hang(id)
		c.advance(sandboxpool.DefaultHealthCheckAfter)
		_, err := a.Acquire(context.Background(), "u", "p")
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
		c.advance(sandboxpool.DefaultUnresponsiveAfter)
		require.Equal(t, id, acquireID(t, b, "u", "p"), "reconnected: the API answers for a hung sandbox")

		next := acquireID(t, a, "u", "p")
		require.NotEqual(t, id, next)
		require.Eventually(t, func() bool { return b.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
			"the other instance forgets the condemned sandbox")
		assert.Equal(t, next, acquireID(t, b, "u", "p"))
	})
}

// hungPairs pools a sandbox for each of u/p0…u/p<n-1>, hangs them all and
// has an Acquire of each probe its sandbox and find it unresponsive; it
// returns their ids.
func hungPairs(t *testing.T, e *env, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = acquireID(t, e.m, "u", fmt.Sprint("p", i))
		e.p.Hang(ids[i])
	}
	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	for i := range ids {
		_, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	}
	return ids
}

// Sandboxes unresponsive together, with no probe answering, are spared:
// the fault looks like the way to them (E2B's sandbox proxy), which a
// replacement would meet too, and a kill would destroy what they hold.
// One, the canary, is replaced every UnresponsiveAfter; when the way back
// opens, the others' probes acquit them, with what they hold. Before,
// every one was killed and replaced at UnresponsiveAfter, and their
// replacements after another UnresponsiveAfter, for as long as the
// incident lasted.
func TestSandboxesUnresponsiveTogetherAreSpared(t *testing.T) {
	e := newEnv(t)
	ids := hungPairs(t, e, 4)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)

	canary := e.acquire(t, "u", "p0")
	assert.Equal(t, sandboxpool.OutcomeCreated, canary.Outcome(), "the first due is the canary")
	e.p.Hang(canary.Sandbox().ID) // its replacement hangs too: the incident goes on
	canary.Release()
	for i := 1; i < len(ids); i++ {
		_, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
		ra, ok := sandboxpool.RetryAfter(err)
		require.True(t, ok)
		assert.Equal(t, sandboxpool.SuspectProbeEvery, ra, "the next probe may acquit it")
	}
	assert.Equal(t, []string{ids[0]}, e.p.Killed())
	st := e.m.Stats()
	assert.EqualValues(t, 1, st.Unresponsive)
	assert.EqualValues(t, 3, st.Spared)

	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter - time.Second) // within UnresponsiveAfter of the canary
	for i := 1; i < len(ids); i++ {
		_, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	}
	assert.Len(t, e.p.Killed(), 1, "no second canary within UnresponsiveAfter")

	for _, id := range append(ids[1:], canary.Sandbox().ID) { // the way back opens
		e.p.Revive(id)
	}
	e.clock.Advance(sandboxpool.SuspectProbeEvery)
	for i := 1; i < len(ids); i++ {
		assert.Equal(t, ids[i], acquireID(t, e.m, "u", fmt.Sprint("p", i)), "acquitted, with what it holds")
	}
	assert.Equal(t, 0, sandboxpool.Suspects(e.m))
	assert.Len(t, e.p.Killed(), 1)
}

// The canaries of a spell already logged at Warn are what that line
// announced, one every UnresponsiveAfter for as long as the incident
// lasts: each is logged at Info, where each was a Warn of its own (99 in a
// 27-second spell of the soak). The first, condemned before the spell was
// known, is a Warn.
func TestCanariesOfALoggedSpellAreInfo(t *testing.T) {
	var logs syncBuffer
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	ids := hungPairs(t, e, 4)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)
	first := e.acquire(t, "u", "p0")
	require.Equal(t, sandboxpool.OutcomeCreated, first.Outcome())
	e.p.Hang(first.Sandbox().ID)
	first.Release()
	for i := 1; i < len(ids); i++ {
		_, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive, "spared")
	}
	require.Contains(t, logs.String(), `level=WARN msg="sandboxpool: sandboxes unresponsive together`)

	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)
	second := e.acquire(t, "u", "p1") // the next canary
	require.Equal(t, sandboxpool.OutcomeCreated, second.Outcome())
	second.Release()
	require.Len(t, e.p.Killed(), 2)
	killed := func(level string) int {
		return strings.Count(logs.String(), "level="+level+` msg="sandboxpool: unresponsive sandbox killed, to be replaced"`)
	}
	assert.Equal(t, 1, killed("WARN"), "the first canary, before the spell was logged")
	assert.Equal(t, 1, killed("INFO"), "the second, which the spell's line announced")
	assert.Contains(t, logs.String(), "canary=true")
}

// A canary whose replacement answers its probe shows the way to the
// sandboxes works: the others are the sandboxes' own faults, and are
// condemned and replaced at their next probes.
func TestCanaryThatAnswersLetsTheOthersBeCondemned(t *testing.T) {
	e := newEnv(t)
	ids := hungPairs(t, e, 4)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)
	canary := acquireID(t, e.m, "u", "p0") // replaced, and its replacement answers
	for i := 1; i < len(ids); i++ {
		_, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive, "spared until a probe answers")
	}

	e.clock.Advance(sandboxpool.DefaultHealthCheckAfter)
	checks := e.p.Calls(fp.OpCheck)
	assert.Equal(t, canary, acquireID(t, e.m, "u", "p0"))
	assert.Equal(t, checks+1, e.p.Calls(fp.OpCheck), "the replacement was probed, and answered")
	for i := 1; i < len(ids); i++ {
		l := e.acquire(t, "u", fmt.Sprint("p", i))
		assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
		l.Release()
	}
	assert.ElementsMatch(t, ids, e.p.Killed())
	assert.EqualValues(t, 4, e.m.Stats().Unresponsive)
}

// Two sandboxes unresponsive at once are two faults: both are condemned
// when due, with no canary between them.
func TestTwoUnresponsiveSandboxesAreBothCondemned(t *testing.T) {
	e := newEnv(t)
	ids := hungPairs(t, e, 2)
	e.clock.Advance(sandboxpool.DefaultUnresponsiveAfter)
	for i := range ids {
		l := e.acquire(t, "u", fmt.Sprint("p", i))
		assert.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
		l.Release()
	}
	assert.ElementsMatch(t, ids, e.p.Killed())
	assert.Zero(t, e.m.Stats().Spared)
}
