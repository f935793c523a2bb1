package e2b_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// setup starts a fake (with a manual clock) and a client for it.
func setup(t *testing.T, cfg e2btest.Config) (*e2b.Client, *e2btest.Server, *clock) {
	t.Helper()
	clk := &clock{t: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)}
	if cfg.Now == nil {
		cfg.Now = clk.Now
	}
	srv := e2btest.Start(cfg)
	t.Cleanup(srv.Close)
	c, err := e2b.New(srv.ClientOptions())
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)
	return c, srv, clk
}

var ctx = context.Background()

func TestNewValidates(t *testing.T) {
	_, err := e2b.New(e2b.Options{})
	require.ErrorContains(t, err, "APIKey is required")
	_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), BaseURL: "ftp://x"})
	require.ErrorContains(t, err, "BaseURL")
	// Header values net/http would refuse to send, on every call.
	for _, key := range []string{"e2b_s3cr3t\n", " e2b_s3cr3t", "e2b_s3\x00cr3t", "e2b s3cr3t"} {
		_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret(key)})
		require.ErrorContains(t, err, "APIKey holds a space or a control character", "%q", key)
		assert.NotContains(t, err.Error(), "s3cr3t")
	}
	_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), UserAgent: "app/1\r\nX-Evil: 1"})
	require.ErrorContains(t, err, "UserAgent")
	_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), RetryQuota: 9})
	require.ErrorContains(t, err, "RetryQuota 9 could never pay")
	_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), RetryQuota: 10})
	require.NoError(t, err)
	// Credentials in a URL are refused, and never shown.
	for _, o := range []e2b.Options{
		{BaseURL: "https://me:s3cr3t@api.e2b.app"},
		{SandboxURL: "https://me:s3cr3t@sandbox.example"},
		{BaseURL: "ftp://me:s3cr3t@x"},
		{BaseURL: "http://me:s3cr3t@[::1"}, // does not parse
	} {
		o.APIKey = e2b.NewSecret("k")
		_, err = e2b.New(o)
		require.Error(t, err, "%+v", o)
		assert.NotContains(t, err.Error(), "s3cr3t")
	}
	_, err = e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), BaseURL: "https://me:s3cr3t@api.e2b.app"})
	require.ErrorContains(t, err, `"https://me:xxxxx@api.e2b.app" carries credentials`)
	c, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("k")})
	require.NoError(t, err)
	assert.Equal(t, "e2b.Client{https://api.e2b.app}", c.String())
	assert.Equal(t, "https://49983-i1.e2b.app", c.EnvdURL(e2b.Sandbox{ID: "i1"}))
}

// The API's own default timeout is 15 s: create must always send one.
func TestCreateAlwaysSendsTimeout(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	end, ok := srv.EndAt(sb.ID)
	require.True(t, ok)
	assert.Equal(t, clk.Now().Add(e2b.DefaultSandboxTimeout), end, "default 300 s, not the server's 15 s")

	sb, err = c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 1500 * time.Millisecond})
	require.NoError(t, err)
	end, _ = srv.EndAt(sb.ID)
	assert.Equal(t, clk.Now().Add(2*time.Second), end, "rounded up to whole seconds")
	assert.False(t, sb.EnvdAccessToken.IsZero(), "created secure: envd needs a token")
	assert.Equal(t, "base", sb.TemplateID)
}

func TestAuthHeaderAndUserAgent(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	_, err := c.List(ctx, nil)
	require.NoError(t, err)
	h := srv.LastHeader()
	assert.Equal(t, e2btest.APIKey, h.Get("X-API-Key"))
	assert.Regexp(t, `^sandboxpool-e2b/\d+\.\d+\.\d+`, h.Get("User-Agent"))

	bad, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("e2b_wrong"), BaseURL: srv.URL})
	require.NoError(t, err)
	_, err = bad.List(ctx, nil)
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, http.StatusUnauthorized, ae.StatusCode)
	assert.EqualValues(t, 2, srv.Calls(e2btest.OpList), "401 is not retried")
}

func TestKillTreats404AsSuccess(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	require.NoError(t, c.Kill(ctx, sb.ID))
	require.NoError(t, c.Kill(ctx, sb.ID))
	assert.Empty(t, srv.Running())
}

func TestNotFoundOnlyWhenDefinitive(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	_, err := c.Get(ctx, "inosuchsandbox")
	require.ErrorIs(t, err, e2b.ErrNotFound)
	assert.Contains(t, err.Error(), "doesn't exist")
	_, err = c.Connect(ctx, "inosuchsandbox", time.Minute)
	require.ErrorIs(t, err, e2b.ErrNotFound)
	require.ErrorIs(t, c.SetTimeout(ctx, "inosuchsandbox", time.Minute), e2b.ErrNotFound)

	srv.Inject(e2btest.OpCreate, e2btest.Fault{Status: http.StatusNotFound, Message: "template not found"})
	_, err = c.Create(ctx, e2b.CreateParams{Template: "nope"})
	require.Error(t, err)
	assert.NotErrorIs(t, err, e2b.ErrNotFound, "a 404 on create names a template, not a sandbox")
	assert.NotErrorIs(t, err, e2b.ErrOutcomeUnknown, "a 4xx create certainly did nothing")

	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusInternalServerError})
	_, err = c.Get(ctx, "inosuchsandbox")
	require.Error(t, err)
	assert.NotErrorIs(t, err, e2b.ErrNotFound)
}

func TestRetriesHonourRetryAfter(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	srv.Inject(e2btest.OpConnect, e2btest.Fault{Status: http.StatusTooManyRequests, RetryAfter: time.Second})
	start := time.Now()
	_, err = c.Connect(ctx, sb.ID, time.Minute)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(start), time.Second, "waited as Retry-After said")
	assert.EqualValues(t, 2, srv.Calls(e2btest.OpConnect))
}

// A listing whose page token comes back is an error, not an endless walk.
func TestListStopsWhenAPageTokenRepeats(t *testing.T) {
	var calls atomic.Int64
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Next-Token", fmt.Sprint("t", min(n, 3))) // t1, t2, t3, t3, ...
		_, _ = fmt.Fprintf(w, `[{"sandboxID":"i%d","templateID":"base","clientID":"c","envdVersion":"0.2.0","cpuCount":2,"memoryMB":512,"diskSizeMB":512,"startedAt":"2026-11-25T12:00:00Z","endAt":"2026-11-25T12:05:00Z","state":"running"}]`, n)
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second) // the walk it replaces ended only with its context
	defer cancel()
	_, err = cl.List(lctx, map[string]string{"k": "v"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "repeated an earlier page token")
	assert.EqualValues(t, 4, calls.Load(), "stops at the first repeat")
}

// A server that does not apply the metadata filter (an API change, a proxy
// that dropped the query) lists nothing that does not match it: a caller
// gets its own sandboxes only, and an unfiltered List gets every one.
func TestListKeepsOnlyWhatTheFilterMatches(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		var page []string
		for i, md := range []string{`{"a":"1","b":"2","c":"3"}`, `{"a":"1"}`, `{"a":"1","b":"x"}`, ``} {
			if md != "" {
				md = `,"metadata":` + md
			}
			page = append(page, fmt.Sprintf(`{"sandboxID":"i%d","templateID":"base","clientID":"c","envdVersion":"0.2.0","cpuCount":2,"memoryMB":512,"diskSizeMB":512,"startedAt":"2026-11-25T12:00:00Z","endAt":"2026-11-25T12:05:00Z","state":"running"%s}`, i, md))
		}
		_, _ = w.Write([]byte("[" + strings.Join(page, ",") + "]"))
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	ids := func(filter map[string]string) (out []string) {
		found, err := cl.List(ctx, filter)
		require.NoError(t, err)
		for _, sb := range found {
			out = append(out, sb.ID)
		}
		return out
	}
	assert.Equal(t, []string{"i0"}, ids(map[string]string{"a": "1", "b": "2"}))
	assert.Equal(t, []string{"i0", "i1", "i2"}, ids(map[string]string{"a": "1"}))
	assert.Equal(t, []string{"i0", "i1", "i2", "i3"}, ids(nil))
}

// The fake's fault queue: each fault meets one request, Pending counts
// those left, and ClearFaults drops them.
func TestFakeFaultQueue(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	srv.Inject(e2btest.OpList, e2btest.Fault{Status: http.StatusBadRequest}, e2btest.Fault{Status: http.StatusBadRequest})
	assert.Equal(t, 2, srv.Pending(e2btest.OpList))
	assert.Equal(t, 0, srv.Pending(e2btest.OpCreate))
	_, err := c.List(ctx, nil)
	require.Error(t, err)
	assert.Equal(t, 1, srv.Pending(e2btest.OpList))
	srv.ClearFaults()
	assert.Equal(t, 0, srv.Pending(e2btest.OpList))
	_, err = c.List(ctx, nil)
	require.NoError(t, err)
}

// A listing that never ends, each page with a new token, stops at a bound.
func TestListStopsAfterItsPageBound(t *testing.T) {
	var calls atomic.Int64
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Next-Token", fmt.Sprint("t", n))
		_, _ = w.Write([]byte(`[]`))
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	lctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = cl.List(lctx, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "more than 1000 pages")
	assert.EqualValues(t, 1000, calls.Load())
}

// A list page far larger than a transport's usual buffers (100 sandboxes
// with 16 KiB of metadata each, 1.7 MB) decodes whole; an answer beyond the
// client's bound is an error of its own, neither retried nor "unreachable".
func TestLargeAnswersDecodeWholeAndHugeOnesAreRefused(t *testing.T) {
	var calls atomic.Int64
	pad := strings.Repeat("x", 16<<10)
	var huge atomic.Bool
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if huge.Load() {
			_, _ = w.Write([]byte(`[{"sandboxID":"i1","metadata":{"pad":"` + strings.Repeat("y", 17<<20) + `"}}]`))
			return
		}
		page := make([]string, 100)
		for i := range page {
			page[i] = fmt.Sprintf(`{"sandboxID":"i%d","templateID":"base","clientID":"c","envdVersion":"0.2.0","cpuCount":2,"memoryMB":512,"diskSizeMB":512,"startedAt":"2026-11-25T12:00:00Z","endAt":"2026-11-25T12:05:00Z","state":"running","metadata":{"pad":%q}}`, i, pad)
		}
		_, _ = w.Write([]byte("[" + strings.Join(page, ",") + "]"))
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	got, err := cl.List(ctx, nil)
	require.NoError(t, err)
	require.Len(t, got, 100)
	assert.Len(t, got[99].Metadata["pad"], 16<<10)

	huge.Store(true)
	calls.Store(0)
	_, err = cl.List(ctx, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "e2b: list: response longer than")
	assert.NotErrorIs(t, err, e2b.ErrUnreachable)
	assert.EqualValues(t, 1, calls.Load(), "not retried")
}

// A connect or a set-timeout answered 409 (the sandbox is being paused,
// snapshotted or killed) is retried: it runs again, or comes back 404 once
// the sandbox is gone, which is the definitive not-found the pool replaces
// on (within the Acquire that met it: TestE2BSandboxBeingKilledIsReplaced).
func TestConflictsAreRetried(t *testing.T) {
	for op, call := range map[e2btest.Op]func(c *e2b.Client, id string) error{
		e2btest.OpConnect: func(c *e2b.Client, id string) error { _, err := c.Connect(ctx, id, time.Minute); return err },
		e2btest.OpTimeout: func(c *e2b.Client, id string) error { return c.SetTimeout(ctx, id, time.Minute) },
	} {
		t.Run(string(op), func(t *testing.T) {
			c, srv, _ := setup(t, e2btest.Config{})
			sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
			require.NoError(t, err)
			srv.Inject(op, e2btest.Fault{Status: http.StatusConflict, Message: "Sandbox \"" + sb.ID + "\" is being paused"},
				e2btest.Fault{Status: http.StatusConflict})
			require.NoError(t, call(c, sb.ID))
			assert.EqualValues(t, 3, srv.Calls(op))

			srv.Inject(op, e2btest.Fault{Status: http.StatusConflict, Message: "Sandbox \"" + sb.ID + "\" is being killed"})
			require.NoError(t, c.Kill(ctx, sb.ID))
			require.ErrorIs(t, call(c, sb.ID), e2b.ErrNotFound, "the retry finds it gone")
		})
	}
}

// A create answered 201 with a body that names no sandbox may still have
// made one: its outcome is unknown, and it is not retried.
func TestCreateAnswerWithoutIDIsAnUnknownOutcome(t *testing.T) {
	var calls atomic.Int64
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte(`{"templateID":"base","clientID":"c","envdVersion":"0.2.0"}`))
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	_, err = cl.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrOutcomeUnknown)
	assert.Contains(t, err.Error(), "names no sandbox")
	assert.EqualValues(t, 1, calls.Load())
}

// An answer with a success status whose body does not decode is an error,
// never a not-found (the pool replaces a sandbox only on a definitive
// not-found), and for a create an unknown outcome (the sandbox may exist).
// The error does not quote the body, which may hold an access token.
func TestUndecodableAnswersAreAmbiguous(t *testing.T) {
	const body = `{"sandboxID": 42, "envdAccessToken": "tok_secret"`
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodPost && r.URL.Path == "/sandboxes" {
			w.WriteHeader(http.StatusCreated)
		}
		_, _ = w.Write([]byte(body))
	}))
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()

	_, err = cl.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrOutcomeUnknown, "create")
	errs := []error{err}
	_, err = cl.Connect(ctx, "isandbox", time.Minute)
	errs = append(errs, err)
	_, err = cl.Get(ctx, "isandbox")
	errs = append(errs, err)
	_, err = cl.List(ctx, map[string]string{"k": "v"})
	errs = append(errs, err)
	for i, err := range errs {
		require.Error(t, err, i)
		assert.NotErrorIs(t, err, e2b.ErrNotFound, i)
		assert.Contains(t, err.Error(), "decoding", i)
		assert.NotContains(t, err.Error(), "tok_secret", i)
	}
}

// A Retry-After longer than MaxRetryWait is not waited out: the call returns
// at once with the hint, however large the number the server sent.
func TestRetryAfterBeyondMaxRetryWaitReturnsAtOnce(t *testing.T) {
	for _, c := range []struct {
		header string
		want   time.Duration
	}{
		{"60", time.Minute},
		{"99999999999", math.MaxInt64 / time.Second * time.Second}, // too large for a Duration
	} {
		t.Run(c.header, func(t *testing.T) {
			var calls atomic.Int64
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				w.Header().Set("Retry-After", c.header)
				http.Error(w, "slow down", http.StatusTooManyRequests)
			}))
			defer ts.Close()
			cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL, MaxRetryWait: 30 * time.Second})
			require.NoError(t, err)
			defer cl.CloseIdleConnections()
			start := time.Now()
			_, err = cl.List(ctx, nil)
			var ae *e2b.APIError
			require.ErrorAs(t, err, &ae)
			assert.Equal(t, c.want, ae.RetryAfter)
			assert.EqualValues(t, 1, calls.Load(), "not retried")
			assert.Less(t, time.Since(start), 5*time.Second)
		})
	}
}

func TestRetryGivesUpWhenContextCannotWait(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	srv.Inject(e2btest.OpList, e2btest.Fault{Status: http.StatusTooManyRequests, RetryAfter: 30 * time.Second})
	// The deadline is far from the call's own time and far short of the
	// 30 s wait: a client that slept until it would take 10 s, one that
	// gives up at once takes a round trip, with room for a loaded CI host.
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.List(cctx, nil)
	require.Error(t, err)
	assert.Less(t, time.Since(start), 5*time.Second, "does not sleep towards a wait the caller's deadline cannot cover")
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 30*time.Second, ae.RetryAfter)
	assert.Equal(t, 30*time.Second, ae.RetryAfterHint())
}

func TestIdempotentCallsRetryTransientFailures(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: 502}, e2btest.Fault{Drop: true}, e2btest.Fault{Status: 503})
	got, err := c.Get(ctx, sb.ID)
	require.NoError(t, err)
	assert.Equal(t, e2b.StateRunning, got.State)
	assert.EqualValues(t, 4, srv.Calls(e2btest.OpGet))

	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503})
	_, err = c.Get(ctx, sb.ID)
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae, "gives up after MaxRetries")
	assert.Equal(t, 503, ae.StatusCode)
}

// A call that got no answer, after its retries, matches ErrUnreachable, so a
// caller can tell "E2B could not be reached" from an answer (an *APIError)
// and from its own context ending.
func TestNoAnswerIsUnreachable(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	drops := []e2btest.Fault{{Drop: true}, {Drop: true}, {Drop: true}, {Drop: true}, {Drop: true}}
	srv.Inject(e2btest.OpGet, drops...)
	_, err = c.Get(ctx, sb.ID)
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.Contains(t, err.Error(), "e2b: get "+sb.ID+": ", "names the call")
	var ae *e2b.APIError
	assert.False(t, errors.As(err, &ae), "no answer is no *APIError")

	srv.Inject(e2btest.OpCreate, e2btest.Fault{Drop: true, AfterEffect: true})
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	require.ErrorIs(t, err, e2b.ErrOutcomeUnknown, "a create that got no answer may have happened")
	assert.True(t, strings.HasPrefix(err.Error(), "e2b: create: "), "a call with no sandbox is named by its operation alone: %v", err)

	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503})
	_, err = c.Get(ctx, sb.ID)
	require.ErrorAs(t, err, &ae)
	assert.NotErrorIs(t, err, e2b.ErrUnreachable, "a 503 is an answer")

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = c.Get(cctx, sb.ID)
	require.ErrorIs(t, err, context.Canceled)
	assert.NotErrorIs(t, err, e2b.ErrUnreachable, "the caller's own context ended")
	_, err = c.List(cctx, nil)
	require.ErrorIs(t, err, context.Canceled)
	assert.True(t, strings.HasPrefix(err.Error(), "e2b: list: "), "%v", err)
}

func TestCreateRetriedOnlyWhenNothingHappened(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	srv.Inject(e2btest.OpCreate, e2btest.Fault{Status: http.StatusTooManyRequests})
	_, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err, "a 429 is a refusal: retried")
	assert.Len(t, srv.Running(), 1)

	for _, f := range []e2btest.Fault{{Status: 504, AfterEffect: true}, {Drop: true, AfterEffect: true}, {Status: 502, AfterEffect: true}} {
		before := srv.Calls(e2btest.OpCreate)
		srv.Inject(e2btest.OpCreate, f)
		_, err = c.Create(ctx, e2b.CreateParams{Template: "base", Metadata: map[string]string{"f": fmt.Sprint(f)}})
		require.ErrorIs(t, err, e2b.ErrOutcomeUnknown, "%+v", f)
		assert.Equal(t, before+1, srv.Calls(e2btest.OpCreate), "never retried blind: %+v", f)
	}
	assert.Len(t, srv.Running(), 4, "the failed-looking creates did happen")
}

func TestConcurrencyCap429(t *testing.T) {
	c, _, _ := setup(t, e2btest.Config{MaxConcurrent: 1})
	_, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 429, ae.StatusCode)
	assert.Contains(t, ae.Message, "maximum number of concurrent E2B sandboxes (1)")
	assert.NotErrorIs(t, err, e2b.ErrOutcomeUnknown)
}

func TestListMetadataEncodingAndPaging(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	want := map[string]string{"sandboxpool.user": "a+b=c&d@x", "sandboxpool.project": "p q/%25;,?#"}
	ids := map[string]bool{}
	for range 250 {
		sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Metadata: want})
		require.NoError(t, err)
		ids[sb.ID] = true
		clk.Advance(time.Millisecond)
	}
	for range 30 { // decoys differ by one character, or lack a key
		_, err := c.Create(ctx, e2b.CreateParams{Template: "base", Metadata: map[string]string{"sandboxpool.user": "a+b=c&d@y", "sandboxpool.project": want["sandboxpool.project"]}})
		require.NoError(t, err)
		_, err = c.Create(ctx, e2b.CreateParams{Template: "base", Metadata: map[string]string{"sandboxpool.user": want["sandboxpool.user"]}})
		require.NoError(t, err)
	}
	before := srv.Calls(e2btest.OpList)
	got, err := c.List(ctx, want)
	require.NoError(t, err)
	assert.Len(t, got, 250)
	for _, sb := range got {
		assert.True(t, ids[sb.ID], sb.ID)
		assert.Equal(t, want, sb.Metadata)
	}
	assert.EqualValues(t, 3, srv.Calls(e2btest.OpList)-before, "three pages of ≤100, following X-Next-Token")
	for i := 1; i < len(got); i++ {
		assert.False(t, got[i].StartedAt.After(got[i-1].StartedAt), "newest first")
	}

	all, err := c.List(ctx, nil)
	require.NoError(t, err)
	assert.Len(t, all, 310)
}

func TestMetadataQueryRoundTrip(t *testing.T) {
	md := map[string]string{"a&b": "c=d", "e f": "g+h", "%": "/?#", "ü": "\x01"}
	back, err := e2b.DecodeMetadataQuery(mustUnescape(t, e2b.EncodeMetadataQuery(md)))
	require.NoError(t, err)
	assert.Equal(t, md, back)
}

func TestConnectResumesAndOnlyExtends(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 10 * time.Minute})
	require.NoError(t, err)
	_, err = c.Connect(ctx, sb.ID, time.Minute)
	require.NoError(t, err)
	end, _ := srv.EndAt(sb.ID)
	assert.Equal(t, clk.Now().Add(10*time.Minute), end, "connect never shortens")

	paused, err := c.Pause(ctx, sb.ID)
	require.NoError(t, err)
	assert.True(t, paused)
	paused, err = c.Pause(ctx, sb.ID)
	require.NoError(t, err)
	assert.False(t, paused, "409 already paused")
	assert.Equal(t, []string{sb.ID}, srv.Paused())
	require.ErrorIs(t, c.SetTimeout(ctx, sb.ID, time.Minute), e2b.ErrNotFound, "a paused sandbox is not live")

	got, err := c.Connect(ctx, sb.ID, 2*time.Minute)
	require.NoError(t, err)
	assert.Equal(t, e2b.StateRunning, got.State)
	assert.Equal(t, []string{sb.ID}, srv.Running())
	end, _ = srv.EndAt(sb.ID)
	assert.Equal(t, clk.Now().Add(2*time.Minute), end, "resumed with the configured timeout")
}

func TestSetTimeoutMayShorten(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 10 * time.Minute})
	require.NoError(t, err)
	require.NoError(t, c.SetTimeout(ctx, sb.ID, time.Minute))
	end, _ := srv.EndAt(sb.ID)
	assert.Equal(t, clk.Now().Add(time.Minute), end)
}

func TestHealthHasNoSideEffects(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: time.Minute})
	require.NoError(t, err)
	before, _ := srv.EndAt(sb.ID)
	clk.Advance(30 * time.Second)
	ok, err := c.Healthy(ctx, sb)
	require.NoError(t, err)
	assert.True(t, ok)
	h := srv.LastHeader()
	assert.Equal(t, sb.ID, h.Get("E2b-Sandbox-Id"))
	assert.Equal(t, sb.EnvdAccessToken.Reveal(), h.Get("X-Access-Token"))
	after, _ := srv.EndAt(sb.ID)
	assert.Equal(t, before, after, "a probe never extends the deadline")

	srv.PauseNow(sb.ID)
	ok, err = c.Healthy(ctx, sb)
	require.NoError(t, err)
	assert.False(t, ok)
	ok, err = c.Healthy(ctx, e2b.Sandbox{ID: "igone"})
	require.NoError(t, err)
	assert.False(t, ok)
}

func TestFakeExpiresAtDeadline(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 10 * time.Second})
	require.NoError(t, err)
	ap, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 10 * time.Second, AutoPause: true})
	require.NoError(t, err)
	clk.Advance(9 * time.Second)
	_, err = c.Get(ctx, sb.ID)
	require.NoError(t, err)
	clk.Advance(time.Second)
	_, err = c.Get(ctx, sb.ID)
	require.ErrorIs(t, err, e2b.ErrNotFound)
	got, err := c.Get(ctx, ap.ID)
	require.NoError(t, err)
	assert.Equal(t, e2b.StatePaused, got.State, "autoPause pauses at the deadline")
	assert.Equal(t, []string{ap.ID}, srv.Paused())
}

// During an outage (Down) every request fails, sandboxes reach their
// deadlines all the same, and a fault queued by Inject still comes first;
// after Up, requests pass again.
func TestFakeOutage(t *testing.T) {
	c, srv, clk := setup(t, e2btest.Config{})
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 10 * time.Second})
	require.NoError(t, err)
	srv.Down(e2btest.Fault{Status: http.StatusServiceUnavailable})
	var ae *e2b.APIError
	_, err = c.Get(ctx, sb.ID)
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, http.StatusServiceUnavailable, ae.StatusCode)
	require.Error(t, c.SetTimeout(ctx, sb.ID, time.Minute))
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusTeapot})
	_, err = c.Get(ctx, sb.ID)
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, http.StatusTeapot, ae.StatusCode, "the queued fault first")
	clk.Advance(10 * time.Second)
	srv.Up()
	_, err = c.Get(ctx, sb.ID)
	require.ErrorIs(t, err, e2b.ErrNotFound, "its deadline passed during the outage")
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
}

func TestFakeRejectsBadInput(t *testing.T) {
	c, _, _ := setup(t, e2btest.Config{})
	_, err := c.Get(ctx, "Bad_ID")
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 400, ae.StatusCode)
	assert.Equal(t, "Invalid sandbox ID", ae.Message)
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: 2 * time.Hour})
	require.ErrorAs(t, err, &ae)
	assert.Contains(t, ae.Message, "Timeout cannot be greater than 1 hours")
}

func TestLatencyFaultHonoursContext(t *testing.T) {
	c, srv, _ := setup(t, e2btest.Config{})
	srv.Inject(e2btest.OpList, e2btest.Fault{Latency: time.Hour})
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err := c.List(cctx, nil)
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.DeadlineExceeded), err)
}

func mustUnescape(t *testing.T, s string) string {
	t.Helper()
	// The HTTP layer escapes the parameter once more, and the server's
	// query parser undoes exactly that.
	v, err := url.QueryUnescape(url.QueryEscape(s))
	require.NoError(t, err)
	return v
}

// FuzzRetryAfter: whatever a server sends as Retry-After, the wait read
// from it is never negative, and a number of seconds is read as exactly
// that many, or as the longest wait when it is too large for a Duration.
func FuzzRetryAfter(f *testing.F) {
	for _, v := range []string{"", "0", "5", " 120 ", "-1", "+3", "9223372036", "9223372037", "18446744073709551616",
		"Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "soon"} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v string) {
		d := e2b.ParseRetryAfter(v)
		require.GreaterOrEqual(t, d, time.Duration(0), "Retry-After %q", v)
		digits := strings.TrimSpace(v)
		if digits == "" || strings.Trim(digits, "0123456789") != "" {
			return
		}
		n, ok := new(big.Int).SetString(digits, 10)
		require.True(t, ok)
		want := new(big.Int).Mul(n, big.NewInt(int64(time.Second)))
		if want.IsInt64() {
			require.Equal(t, time.Duration(want.Int64()), d, "Retry-After %q", v)
		} else {
			require.Equal(t, math.MaxInt64/time.Second*time.Second, d, "Retry-After %q", v)
		}
	})
}

// FuzzMetadataQuery: whatever keys and values a caller uses, the filter our
// client sends decodes, on E2B's side, to exactly the same pairs.
func FuzzMetadataQuery(f *testing.F) {
	f.Add("sandboxpool.user", "a+b=c&d", "k", "%zz")
	f.Add("", "", "=", "&")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		md := map[string]string{k1: v1, k2: v2}
		back, err := e2b.DecodeMetadataQuery(mustUnescape(t, e2b.EncodeMetadataQuery(md)))
		require.NoError(t, err)
		require.Equal(t, md, back)
	})
}

// The default client keeps the connections of a burst of calls for the
// next: net/http's default keeps 2 per host, and a burst of 16 (a reaper
// tick's width) then dialled 14 new connections, each a TLS handshake
// against E2B.
func TestDefaultClientKeepsABurstsConnections(t *testing.T) {
	const width = 16
	var dials atomic.Int64
	arrived := make(chan struct{})
	var release atomic.Pointer[chan struct{}]
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-*release.Load()
		w.WriteHeader(http.StatusNoContent)
	}))
	ts.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			dials.Add(1)
		}
	}
	ts.Start()
	defer ts.Close()
	cl, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret(e2btest.APIKey), BaseURL: ts.URL})
	require.NoError(t, err)
	defer cl.CloseIdleConnections()
	burst := func() {
		ch := make(chan struct{})
		release.Store(&ch)
		var g errgroup.Group
		for i := range width {
			g.Go(func() error { return cl.Kill(ctx, fmt.Sprintf("i%d", i)) })
		}
		for range width { // every call holds a connection of its own
			<-arrived
		}
		close(ch)
		require.NoError(t, g.Wait())
	}
	burst()
	require.EqualValues(t, width, dials.Load())
	burst()
	assert.EqualValues(t, width, dials.Load(), "the second burst dialled again")
}

// While every call fails, the Client's retries stop once they have spent
// its retry quota (100 retries after error answers, at the default): an E2B
// incident then meets each call once, not MaxRetries+1 times. Calls that
// succeed give the quota back, a retry after no answer costs twice one after
// an answer, and envd health checks spend a quota of their own.
func TestRetryQuotaBoundsRetriesWhileCallsKeepFailing(t *testing.T) {
	c, srv := quotaClient(t, 0, time.Millisecond, 2*time.Millisecond)
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: time.Hour})
	require.NoError(t, err)

	srv.Down(e2btest.Fault{Status: http.StatusServiceUnavailable})
	const callers, calls = 8, 50
	var g errgroup.Group
	for range callers {
		g.Go(func() error {
			for range calls {
				var ae *e2b.APIError
				if _, err := c.Get(ctx, sb.ID); !errors.As(err, &ae) || ae.StatusCode != http.StatusServiceUnavailable {
					return fmt.Errorf("want the 503, got %v", err)
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	assert.EqualValues(t, callers*calls+e2b.DefaultRetryQuota/5, srv.Calls(e2btest.OpGet),
		"400 calls, and 100 retries: without the quota, 1,600 requests")
	assert.Equal(t, e2b.Stats{Requests: srv.Requests(), Retries: 100, RetriesUnsent: callers*calls*e2b.DefaultMaxRetries - 100,
		RetryTokensAPI: 0, RetryTokensEnvd: e2b.DefaultRetryQuota}, c.Stats())
	_, err = c.Get(ctx, sb.ID)
	require.ErrorContains(t, err, "retry quota is spent")
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae, "the answer stays matchable")

	// The envd quota is untouched: a failed health check is still retried.
	srv.Up()
	srv.Inject(e2btest.OpHealth, e2btest.Fault{Status: http.StatusServiceUnavailable})
	ok, err := c.Healthy(ctx, sb)
	require.NoError(t, err)
	assert.True(t, ok)
	assert.EqualValues(t, 2, srv.Calls(e2btest.OpHealth))

	// Each success puts a token back: four are not enough for a retry, five
	// are; a retry that succeeds gives back what it took.
	for range 4 {
		_, err = c.Get(ctx, sb.ID)
		require.NoError(t, err)
	}
	calls0 := srv.Calls(e2btest.OpGet)
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusServiceUnavailable})
	_, err = c.Get(ctx, sb.ID)
	require.ErrorContains(t, err, "retry quota is spent")
	assert.Equal(t, calls0+1, srv.Calls(e2btest.OpGet))
	_, err = c.Get(ctx, sb.ID) // the fifth token
	require.NoError(t, err)
	for range 3 {
		srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusServiceUnavailable})
		_, err = c.Get(ctx, sb.ID)
		require.NoError(t, err, "retried, and the retry's cost given back")
	}

	// A retry after no answer costs 10: five tokens are not enough. (A
	// set-timeout is a POST, which net/http does not resend by itself.)
	srv.Inject(e2btest.OpTimeout, e2btest.Fault{Drop: true})
	err = c.SetTimeout(ctx, sb.ID, time.Hour)
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	require.ErrorContains(t, err, "retry quota is spent")
	for range 5 {
		_, err = c.Get(ctx, sb.ID)
		require.NoError(t, err)
	}
	srv.Inject(e2btest.OpTimeout, e2btest.Fault{Drop: true})
	require.NoError(t, c.SetTimeout(ctx, sb.ID, time.Hour), "ten tokens pay for it")
	assert.EqualValues(t, 3, srv.Calls(e2btest.OpTimeout))
}

// A retry the quota cannot pay for is not sent, but the call keeps its
// backoff schedule rather than failing at once: a later step sends if calls
// that succeeded meanwhile put tokens back.
func TestUnpaidRetryKeepsItsSchedule(t *testing.T) {
	const step = 200 * time.Millisecond
	c, srv := quotaClient(t, 10, step, step) // two retries
	e2b.WithoutJitter(c)                     // retries are due at 1, 2 and 3 steps
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: time.Hour})
	require.NoError(t, err)

	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503})
	_, err = c.Get(ctx, sb.ID)
	require.ErrorContains(t, err, "1 of its retries not sent")
	require.EqualValues(t, 3, srv.Calls(e2btest.OpGet), "the quota paid for two retries")

	// The quota is empty. A failing call's first retry goes unsent; five
	// successes between its first and second retries pay for the second.
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: 503}, e2btest.Fault{Status: 503})
	done := make(chan error, 1)
	go func() { _, err := c.Get(ctx, sb.ID); done <- err }()
	require.Eventually(t, func() bool { return srv.Calls(e2btest.OpGet) == 4 }, 5*time.Second, time.Millisecond)
	time.Sleep(step * 3 / 2)
	for range 5 {
		_, err = c.List(ctx, nil)
		require.NoError(t, err)
	}
	err = <-done
	var ae *e2b.APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 503, ae.StatusCode)
	assert.ErrorContains(t, err, "2 of its retries not sent")
	assert.EqualValues(t, 5, srv.Calls(e2btest.OpGet), "the call kept waiting, and sent its second retry")
}

// RetryQuota -1 turns the quota off: every failing call makes MaxRetries.
func TestNoRetryQuota(t *testing.T) {
	c, srv := quotaClient(t, -1, time.Millisecond, 2*time.Millisecond)
	srv.Down(e2btest.Fault{Status: http.StatusServiceUnavailable})
	for range 200 {
		_, err := c.Get(ctx, "igone")
		require.Error(t, err)
	}
	assert.EqualValues(t, 200*(e2b.DefaultMaxRetries+1), srv.Calls(e2btest.OpGet))
}

// quotaClient starts a fake and a client for it with the given RetryQuota
// and backoffs.
func quotaClient(t *testing.T, quota int, minBackoff, maxBackoff time.Duration) (*e2b.Client, *e2btest.Server) {
	srv := e2btest.Start(e2btest.Config{})
	t.Cleanup(srv.Close)
	opts := srv.ClientOptions()
	opts.MinBackoff, opts.MaxBackoff, opts.RetryQuota = minBackoff, maxBackoff, quota
	c, err := e2b.New(opts)
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)
	return c, srv
}

// The client follows no redirect: net/http would resend every header but
// Authorization and Cookie to whatever host a 3xx names, the API key and
// envd's access token included. E2B's API and envd never redirect, so a 3xx
// is returned as the answer it is, with the caller's own HTTPClient too,
// which is left as it was.
func TestRedirectsAreNotFollowed(t *testing.T) {
	var foreign atomic.Int64
	var leaked atomic.Value
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		foreign.Add(1)
		leaked.Store(r.Header.Get("X-API-Key") + r.Header.Get("X-Access-Token"))
	}))
	t.Cleanup(elsewhere.Close)
	// Another host name for the same loopback server: net/http treats it
	// as a foreign domain.
	away := strings.Replace(elsewhere.URL, "127.0.0.1", "localhost", 1)
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, away+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	t.Cleanup(redirector.Close)

	theirs := &http.Client{}
	for _, hc := range []*http.Client{nil, theirs} {
		c, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("e2b_secret"), BaseURL: redirector.URL, SandboxURL: redirector.URL, HTTPClient: hc})
		require.NoError(t, err)
		_, err = c.Get(ctx, "isb")
		var ae *e2b.APIError
		require.ErrorAs(t, err, &ae)
		assert.Equal(t, http.StatusTemporaryRedirect, ae.StatusCode)
		_, err = c.Healthy(ctx, e2b.Sandbox{ID: "isb", EnvdAccessToken: e2b.NewSecret("envd_secret")})
		require.ErrorAs(t, err, &ae)
		assert.Equal(t, http.StatusTemporaryRedirect, ae.StatusCode)
		c.CloseIdleConnections()
	}
	assert.Zero(t, foreign.Load(), "a request followed the redirect, with %q", leaked.Load())
	assert.Nil(t, theirs.CheckRedirect, "the caller's client is not changed")
}

// A server certificate the client refuses ends the TLS handshake before the
// request is written: a create that met one did not happen (no "outcome
// unknown"), and no call retries it, since no retry mends a configuration.
// The call got no answer from E2B, so it matches ErrUnreachable.
func TestRefusedCertificateIsNotRetriedNorAnUnknownOutcome(t *testing.T) {
	var reached atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { reached.Add(1) }))
	t.Cleanup(srv.Close)
	c, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), BaseURL: srv.URL, MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)

	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.NotErrorIs(t, err, e2b.ErrOutcomeUnknown, "the request was never written")
	assert.ErrorContains(t, err, "certificate")
	_, err = c.Get(ctx, "isb")
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.Equal(t, e2b.Stats{Requests: 2, RetryTokensAPI: e2b.DefaultRetryQuota, RetryTokensEnvd: e2b.DefaultRetryQuota}, c.Stats(), "no retry")
	assert.Zero(t, reached.Load())
}

// Through an HTTPS proxy, a create that never got past the proxy (it could
// not be dialled, or refused the CONNECT) did not happen: it is retried,
// and never an unknown outcome. net/http reports both as "proxyconnect".
func TestProxyFailuresAreNotSent(t *testing.T) {
	var connects atomic.Int64
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		connects.Add(1)
		w.WriteHeader(http.StatusProxyAuthRequired)
	}))
	t.Cleanup(refusing.Close)
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close() // nothing listens there now
	for _, proxy := range []string{refusing.URL, dead.URL} {
		pu, err := url.Parse(proxy)
		require.NoError(t, err)
		tr := &http.Transport{Proxy: http.ProxyURL(pu)}
		t.Cleanup(tr.CloseIdleConnections)
		c, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), BaseURL: "https://api.e2b.invalid", HTTPClient: &http.Client{Transport: tr},
			MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
		require.NoError(t, err)
		_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
		require.ErrorIs(t, err, e2b.ErrUnreachable, proxy)
		assert.NotErrorIs(t, err, e2b.ErrOutcomeUnknown, "%s: the create never left the proxy", proxy)
		assert.EqualValues(t, 1+e2b.DefaultMaxRetries, c.Stats().Requests, "%s: retried, as nothing was sent", proxy)
	}
	assert.EqualValues(t, 1+e2b.DefaultMaxRetries, connects.Load())
}

// Whether a failed request was written is read from net/http's trace, the
// same for HTTP/1 and HTTP/2: over HTTP/2, a create whose stream the server
// reset after reading it may have happened (outcome unknown, not retried),
// while a Get that met the same is retried.
func TestWrittenRequestsOverHTTP2AreSent(t *testing.T) {
	var creates, gets atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			creates.Add(1)
		} else {
			gets.Add(1)
		}
		panic(http.ErrAbortHandler) // resets the stream: no answer
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	c, err := e2b.New(e2b.Options{APIKey: e2b.NewSecret("k"), BaseURL: srv.URL, HTTPClient: srv.Client(),
		MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)

	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrOutcomeUnknown)
	assert.ErrorContains(t, err, "stream error", "over HTTP/2")
	assert.EqualValues(t, 1, creates.Load(), "never resent")
	_, err = c.Get(ctx, "isb")
	require.ErrorIs(t, err, e2b.ErrUnreachable)
	assert.EqualValues(t, 1+e2b.DefaultMaxRetries, gets.Load())
}
