package sandboxpool_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

// e2bEnv is a Manager on the real E2B client talking HTTP to the fake.
type e2bEnv struct {
	m     *sandboxpool.Manager
	srv   *e2btest.Server
	cfg   sandboxpool.Config
	clock *fakeClock
}

func newE2BEnv(t *testing.T, fake e2btest.Config, mutate ...func(*sandboxpool.Config)) *e2bEnv {
	t.Helper()
	clk := newFakeClock()
	if fake.Now == nil {
		fake.Now = clk.Now
	}
	srv := e2btest.Start(fake)
	t.Cleanup(srv.Close)
	client, err := e2b.New(srv.ClientOptions())
	require.NoError(t, err)
	cfg := sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)}
	sandboxpool.SetClock(&cfg, clk.Now)
	sandboxpool.ManualReaper(&cfg)
	for _, f := range mutate {
		f(&cfg)
	}
	e := &e2bEnv{srv: srv, cfg: cfg, clock: clk}
	e.m = e.newManager(t)
	return e
}

func (e *e2bEnv) newManager(t *testing.T) *sandboxpool.Manager {
	t.Helper()
	m, err := sandboxpool.New(e.cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

func acquireID(t *testing.T, m *sandboxpool.Manager, user, project string) string {
	t.Helper()
	l, err := m.Acquire(context.Background(), user, project)
	require.NoError(t, err)
	defer l.Release()
	return l.Sandbox().ID
}

func TestE2BSingleFlightOverHTTP(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	e.srv.Inject(e2btest.OpCreate, e2btest.Fault{Latency: 50 * time.Millisecond})
	var wg sync.WaitGroup
	ids := make([]string, 1000)
	for i := range ids {
		wg.Go(func() {
			l, err := e.m.Acquire(context.Background(), "alice", "proj")
			if assert.NoError(t, err) {
				ids[i] = l.Sandbox().ID
				l.Release()
			}
		})
	}
	wg.Wait()
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))
	assert.Len(t, e.srv.Running(), 1)
	for _, id := range ids {
		require.Equal(t, ids[0], id)
	}
	md := e.srv.Metadata(ids[0])
	assert.Equal(t, map[string]string{"sandboxpool.ns": "sandboxpool", "sandboxpool.user": "alice", "sandboxpool.project": "proj"}, md)
	end, _ := e.srv.EndAt(ids[0])
	assert.Equal(t, e.clock.Now().Add(sandboxpool.DefaultIdleTimeout), end, "E2B deadline aligned with IdleTimeout")
}

// A new process (Manager) finds the pair's sandbox by metadata and
// reconnects instead of creating.
func TestE2BReconnectAfterRestart(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{}, func(c *sandboxpool.Config) { c.Metadata = map[string]string{"app": "demo"} })
	id := acquireID(t, e.m, "u", "p")
	require.NoError(t, e.m.Close(context.Background()))
	m2 := e.newManager(t)
	assert.Equal(t, id, acquireID(t, m2, "u", "p"))
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpConnect))
	assert.Equal(t, "demo", e.srv.Metadata(id)["app"])
}

func TestE2BNotFoundReplaces(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	id := acquireID(t, e.m, "u", "p")
	e.srv.Vanish(id)
	e.clock.Advance(time.Minute)
	id2 := acquireID(t, e.m, "u", "p")
	assert.NotEqual(t, id, id2)
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpHealth), "probed through envd")
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpGet), "the API confirmed not-found")
	assert.Equal(t, []string{id2}, e.srv.Running())
}

// An Acquire whose keepalive meets a sandbox being killed (E2B answers the
// timeout 409) is given a new sandbox: the conflict is retried until E2B
// says the sandbox is gone. Before, the 409 failed the Acquire.
func TestE2BSandboxBeingKilledIsReplaced(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	id := acquireID(t, e.m, "u", "p")
	e.clock.Advance(4 * time.Minute) // within a quarter of IdleTimeout of its deadline: the Acquire extends it
	e.srv.Inject(e2btest.OpTimeout, e2btest.Fault{Status: http.StatusConflict, Message: "Sandbox \"" + id + "\" is being killed"})
	e.srv.Vanish(id)
	id2 := acquireID(t, e.m, "u", "p")
	assert.NotEqual(t, id, id2)
	assert.EqualValues(t, 2, e.srv.Calls(e2btest.OpTimeout), "the conflict, then the not-found")
	assert.Equal(t, []string{id2}, e.srv.Running())
}

// A paused sandbox is not running: it is found by metadata and resumed,
// not duplicated.
func TestE2BPausedIsResumed(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	id := acquireID(t, e.m, "u", "p")
	e.srv.PauseNow(id)
	e.clock.Advance(time.Minute)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.Equal(t, []string{id}, e.srv.Running())
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))
}

// Ambiguous failures (envd 500, envd unreachable while the API reports the
// sandbox running) are returned and do not replace: an unresponsive
// sandbox is replaced only once it has been so for UnresponsiveAfter
// (TestE2BHungSandboxIsReplaced).
func TestE2BAmbiguousNeverReplaces(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	id := acquireID(t, e.m, "u", "p")
	e.clock.Advance(time.Minute)
	e.srv.Inject(e2btest.OpHealth, e2btest.Fault{Status: 500}) // not retryable: one answer decides
	_, err := e.m.Acquire(context.Background(), "u", "p")
	require.Error(t, err)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))

	// envd's proxy says "not found" (502) while the API reports the sandbox
	// running: unresponsive and unreachable, which a caller may retry, and
	// not gone.
	e.clock.Advance(time.Minute)
	e.srv.Inject(e2btest.OpHealth, e2btest.Fault{Status: http.StatusBadGateway})
	_, err = e.m.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	require.ErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	e.clock.Advance(sandboxpool.SuspectProbeEvery) // until then the Acquire fails without a probe
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))
}

// The E2B provider maps E2B's answers onto the Provider contract: a
// Connect to a sandbox E2B does not know is ErrSandboxNotFound, and a probe
// that envd's proxy answers "not found" (502) for a sandbox the API reports
// in a state neither running nor paused (one the spec may add) is only
// unreachable: neither gone, so not replaced, nor unresponsive, so not
// condemned after UnresponsiveAfter.
func TestE2BProviderMapsAnswers(t *testing.T) {
	ctx := context.Background()
	_, err := newE2BEnv(t, e2btest.Config{}).cfg.Provider.Connect(ctx, "i9missing", time.Minute)
	require.ErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	require.ErrorIs(t, err, e2b.ErrNotFound)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusBadGateway) })
	mux.HandleFunc("GET /sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprintf(w, `{"sandboxID":%q,"templateID":"base","clientID":"c","startedAt":"2026-11-27T10:00:00Z",`+
			`"endAt":"2026-11-27T10:05:00Z","state":"snapshotting","cpuCount":2,"memoryMB":512,"diskSizeMB":1024,"envdVersion":"0.6.4"}`, r.PathValue("id"))
	})
	odd := httptest.NewServer(mux)
	t.Cleanup(odd.Close)
	client, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("key"), BaseURL: odd.URL, SandboxURL: odd.URL})
	require.NoError(t, err)
	err = sandboxpool.NewE2BProvider(client).Check(ctx, sandboxpool.Sandbox{ID: "i9odd", Domain: "e2b.app"})
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxUnresponsive)
	assert.Contains(t, err.Error(), "reports snapshotting")
	client.CloseIdleConnections()
}

// A probe that gets no answer (envd, or the route to it, hangs) fails its
// Acquire once checkTimeout has passed, and keeps the sandbox. Without the
// bound, the client waited out its one-minute request timeout and retried,
// so every Acquire of the pair waited until its own ctx ended, and the
// pair's fill until CreateTimeout.
func TestE2BProbeThatGetsNoAnswerFailsWithinItsBound(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{}, func(cfg *sandboxpool.Config) { sandboxpool.SetCheckTimeout(cfg, 2*time.Second) })
	id := acquireID(t, e.m, "u", "p")
	e.clock.Advance(time.Minute)
	e.srv.Inject(e2btest.OpHealth, e2btest.Fault{Latency: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.m.Acquire(ctx, "u", "p")
	require.Error(t, err)
	require.NoError(t, ctx.Err(), "failed by the probe's bound, not by the caller's deadline")
	assert.Contains(t, err.Error(), "no answer to its probe within 2s")
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.Equal(t, id, acquireID(t, e.m, "u", "p"), "kept, and handed out once it answers")
	assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate))
}

func TestE2B429BackOff(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{})
	e.srv.Inject(e2btest.OpCreate, e2btest.Fault{Status: http.StatusTooManyRequests, RetryAfter: time.Second})
	start := time.Now()
	acquireID(t, e.m, "u", "p")
	assert.GreaterOrEqual(t, time.Since(start), time.Second)
	assert.EqualValues(t, 2, e.srv.Calls(e2btest.OpCreate))
	assert.Len(t, e.srv.Running(), 1)
}

// E2B's concurrency cap surfaces as an error carrying the 429, not as a
// replacement or a duplicate.
func TestE2BConcurrencyCap(t *testing.T) {
	e := newE2BEnv(t, e2btest.Config{MaxConcurrent: 1})
	acquireID(t, e.m, "u", "p1")
	_, err := e.m.Acquire(context.Background(), "u", "p2")
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 429, ae.StatusCode)
	assert.Contains(t, err.Error(), "u/p2")
	assert.Len(t, e.srv.Running(), 1)
}

// A create whose outcome is unknown (E2B created it, the answer was lost)
// is reconciled by listing the pair's metadata: no duplicate.
func TestE2BUnknownCreateNeverDuplicates(t *testing.T) {
	for name, f := range map[string]e2btest.Fault{
		"504 after create":     {Status: http.StatusGatewayTimeout, AfterEffect: true},
		"dropped after create": {Drop: true, AfterEffect: true},
		"500 after create":     {Status: http.StatusInternalServerError, AfterEffect: true},
	} {
		t.Run(name, func(t *testing.T) {
			e := newE2BEnv(t, e2btest.Config{})
			e.srv.Inject(e2btest.OpCreate, f)
			id := acquireID(t, e.m, "u", "p")
			assert.Equal(t, []string{id}, e.srv.Running(), "exactly one sandbox")
			assert.EqualValues(t, 1, e.srv.Calls(e2btest.OpCreate), "never created blind")
			assert.EqualValues(t, 1, e.m.Stats().Reconciled)
			assert.Equal(t, id, acquireID(t, e.m, "u", "p"))
		})
	}
	t.Run("failed create then retry", func(t *testing.T) {
		e := newE2BEnv(t, e2btest.Config{})
		e.srv.Inject(e2btest.OpCreate, e2btest.Fault{Status: http.StatusServiceUnavailable}) // nothing created
		_, err := e.m.Acquire(context.Background(), "u", "p")
		require.ErrorIs(t, err, e2b.ErrOutcomeUnknown)
		id := acquireID(t, e.m, "u", "p")
		assert.Equal(t, []string{id}, e.srv.Running())
	})
}

func TestE2BFromEnv(t *testing.T) {
	srv := e2btest.NewServer(t)
	cfg, err := sandboxpool.ConfigFrom(map[string]string{
		"E2B_API_KEY": e2btest.APIKey, "E2B_API_URL": srv.URL, "E2B_SANDBOX_URL": srv.EnvdURL,
		"SANDBOXPOOL_HEALTH_CHECK_AFTER": "-1ns",
	})
	require.NoError(t, err)
	m, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	defer m.Close(context.Background())
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	assert.Equal(t, srv.EnvdURL, l.Sandbox().EnvdURL(), "E2B_SANDBOX_URL routes envd")
	l.Release()
	acquireID(t, m, "u", "p") // probes envd through the override
	assert.EqualValues(t, 1, srv.Calls(e2btest.OpHealth))

	_, err = sandboxpool.ConfigFrom(map[string]string{"E2B_DOMAIN": "example.com"})
	require.ErrorContains(t, err, "E2B_DOMAIN is set but E2B_API_KEY is not")
	_, err = sandboxpool.ConfigFrom(map[string]string{"E2B_API_KEY": "k", "E2B_API_URL": "not a url"})
	require.ErrorContains(t, err, "BaseURL")
	assert.NotContains(t, err.Error(), "k\"")
}

// While E2B refuses every call (an incident, a revoked API key), the
// keepalives of the sandboxes in use back off, a quarter of the way to the
// deadline each, and log one Warn per sandbox, not one per try: retried at
// every tick (ReapInterval, 1 s), 200 leased sandboxes made 15,600 calls,
// and logged as many Warn lines, in 5 minutes of a 401. When E2B answers
// again before the deadline, every keepalive gets through in time, and
// says so.
func TestKeepaliveBacksOffWhileTheProviderRefuses(t *testing.T) {
	const n = 20
	var logs syncBuffer
	e := newE2BEnv(t, e2btest.Config{}, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	start := e.clock.Now()
	ids := make([]string, n)
	for i := range n {
		l, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.NoError(t, err)
		defer l.Release()
		ids[i] = l.Sandbox().ID
	}
	tick := func(d time.Duration) { // the reaper at its default interval
		for ; d > 0; d -= sandboxpool.DefaultReapInterval {
			e.clock.Advance(sandboxpool.DefaultReapInterval)
			e.m.ReapNow()
		}
	}

	e.srv.Down(e2btest.Fault{Status: http.StatusUnauthorized})
	tick(4*time.Minute + 40*time.Second) // from 77 s before the 5-minute deadline (the first keepalive) to 20 s before it
	tries := e.srv.Calls(e2btest.OpTimeout)
	assert.GreaterOrEqual(t, tries, int64(3*n), "the keepalive keeps trying")
	assert.LessOrEqual(t, tries, int64(6*n), "tries 77, 57, 42, 31 and 23 s before the deadline, where a try every tick made 58")
	assert.Equal(t, 1, strings.Count(logs.String(), `level=WARN msg="sandboxpool: extending deadline failed`), "one Warn for the outage, not one per sandbox")
	assert.Equal(t, tries, e.m.Stats().TouchErrors, "every refused push is counted")

	e.srv.Up()
	tick(15 * time.Second)
	assert.Equal(t, 1, strings.Count(logs.String(), `level=INFO msg="sandboxpool: the provider takes keepalives and kills again" failures_logged_at_debug=`+fmt.Sprint(tries-1)),
		"one line for the outage's end, counting the failures it kept quiet")
	assert.NotContains(t, logs.String(), `level=INFO msg="sandboxpool: deadline extended again"`, "not one per sandbox")
	assert.ElementsMatch(t, ids, e.srv.Running(), "every sandbox in use outlived the refusals")
	for _, id := range ids {
		end, ok := e.srv.EndAt(id)
		require.True(t, ok)
		assert.True(t, end.After(start.Add(5*time.Minute)), "the deadline of %s was pushed", id)
	}

	// Refusals that outlast the deadline: past it, the tries spread out by
	// a quarter each, up to touchLead (75 s) apart, where a try every tick
	// made 389 a sandbox from the first keepalive on.
	before := e.srv.Calls(e2btest.OpTimeout)
	e.srv.Down(e2btest.Fault{Status: http.StatusUnauthorized})
	tick(10 * time.Minute)
	tries = e.srv.Calls(e2btest.OpTimeout) - before
	assert.LessOrEqual(t, tries, int64(40*n), "about 16 tries before the deadline and 20 in the 5 minutes after it")
	assert.Equal(t, 2, strings.Count(logs.String(), `level=WARN msg="sandboxpool: extending deadline failed`), "one Warn per outage")
}

// An outage of the provider, or a revoked key, makes every sandbox's
// keepalive and every kill fail: one Warn says so, not one per sandbox
// (1,000 sandboxes made 1,000 Warn lines at once, and 1,000 Info lines when
// the keepalives succeeded again). A failure alone among successes is news:
// each such is a Warn.
func TestProviderOutageWarnsOnceNotPerSandbox(t *testing.T) {
	const n = 40
	var logs syncBuffer
	e := newE2BEnv(t, e2btest.Config{}, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	warns := func(msg string) int { return strings.Count(logs.String(), `level=WARN msg="sandboxpool: `+msg) }
	for i := range n { // half leased, for keepalives; half idle, to be evicted and killed
		l, err := e.m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.NoError(t, err)
		if i%2 == 0 {
			defer l.Release()
		} else {
			l.Release()
		}
	}
	tick := func(d time.Duration) {
		for ; d > 0; d -= sandboxpool.DefaultReapInterval {
			e.clock.Advance(sandboxpool.DefaultReapInterval)
			e.m.ReapNow()
		}
	}

	// The outage begins after the first keepalives (77 s before the 5-minute
	// deadline), covers the idle ones' evictions and the next keepalives,
	// and ends before the deadline those pushed.
	tick(4*time.Minute + 50*time.Second)
	e.srv.Down(e2btest.Fault{Status: http.StatusUnauthorized})
	tick(3*time.Minute + 30*time.Second)
	st := e.m.Stats()
	require.Equal(t, int64(n/2), st.KillErrors, "every idle sandbox's kill was refused")
	require.GreaterOrEqual(t, st.TouchErrors, int64(n/2), "every leased sandbox's keepalive was refused")
	assert.Equal(t, 1, warns("extending deadline failed")+warns("kill failed"), "one Warn for the outage")

	e.srv.Up()
	tick(15 * time.Second)
	assert.Equal(t, 1, strings.Count(logs.String(), `level=INFO msg="sandboxpool: the provider takes keepalives and kills again" failures_logged_at_debug=`+fmt.Sprint(st.KillErrors+st.TouchErrors-1)))

	// Two failures, each alone among successes: each is news.
	for range 2 {
		before := e.m.Stats().TouchErrors
		e.srv.Inject(e2btest.OpTimeout, e2btest.Fault{Status: http.StatusUnauthorized})
		for e.m.Stats().TouchErrors == before {
			tick(sandboxpool.DefaultReapInterval)
		}
		tick(time.Minute) // the others' keepalives, and the failed one's retry, succeed
	}
	assert.Equal(t, 3, warns("extending deadline failed")+warns("kill failed"))
	assert.Equal(t, 3, strings.Count(logs.String(), `level=INFO msg="sandboxpool: the provider takes keepalives and kills again"`))
}

// Close closes the E2B client's idle connections: net/http keeps each with
// a goroutine or two for 90 s, which a caller's goleak check after Close
// would find (while E2B, here the fake, still holds its end open).
func TestCloseLetsGoOfTheE2BConnections(t *testing.T) {
	fake := e2btest.Start(e2btest.Config{})
	defer fake.Close()
	client, err := e2b.New(fake.ClientOptions())
	require.NoError(t, err)
	baseline := goleak.IgnoreCurrent()
	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)})
	require.NoError(t, err)
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	l.Release()
	require.NoError(t, m.Close(context.Background()))
	goleak.VerifyNone(t, baseline)
}
