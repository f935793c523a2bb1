package sandboxpool_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

func TestMain(m *testing.M) {
	redis.SetLogger(quietRedis{}) // outage tests make go-redis log every failed dial
	code := m.Run()
	closeFixtures() // benchmark fixtures outlive single benchmark runs
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

var (
	fixturesMu sync.Mutex
	fixtures   = map[string]any{}
	closers    []func()
)

// fixture builds a value once per test binary (benchmarks run their body
// several times; an expensive setup such as 100k pooled pairs is kept) and
// closes it after all tests and benchmarks.
func fixture[T any](key string, build func() (T, func())) T {
	fixturesMu.Lock()
	defer fixturesMu.Unlock()
	if v, ok := fixtures[key]; ok {
		return v.(T)
	}
	v, closer := build()
	fixtures[key] = v
	closers = append(closers, closer)
	return v
}

func closeFixtures() {
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
}

type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

// fakeClock is a manually advanced clock shared by the Manager and the fake.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// env is a Manager on a fake provider with a fake clock, closed at cleanup.
type env struct {
	m     *sandboxpool.Manager
	p     *fakeprovider.Provider
	clock *fakeClock
}

func newEnv(t testing.TB, mutate ...func(*sandboxpool.Config)) *env {
	t.Helper()
	clk := newFakeClock()
	p := fakeprovider.New()
	p.Now = clk.Now
	cfg := sandboxpool.Config{
		Provider:     p,
		IdleTimeout:  5 * time.Minute,
		MaxAge:       15 * time.Minute,
		ReapInterval: reapTick, // the period at which env.run ticks it
	}
	sandboxpool.SetClock(&cfg, clk.Now)
	sandboxpool.ManualReaper(&cfg) // tests drive the reaper with ReapNow
	for _, f := range mutate {
		f(&cfg)
	}
	m, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close(context.Background())) })
	return &env{m: m, p: p, clock: clk}
}

// reapTick is the simulated reaper period of env.run.
const reapTick = 5 * time.Second

// run advances the clock by d in reapTick steps, running the reaper after
// each, as a Manager's ticking reaper would.
func (e *env) run(d time.Duration) {
	for ; d > 0; d -= reapTick {
		e.clock.Advance(min(d, reapTick))
		e.m.ReapNow()
	}
}

func (e *env) acquire(t testing.TB, user, project string) *sandboxpool.Lease {
	t.Helper()
	l, err := e.m.Acquire(context.Background(), user, project)
	require.NoError(t, err)
	return l
}

// endedKills is a Provider that counts the Kill calls that have returned:
// a test's sign that a call waiting on a kill has gone past it.
type endedKills struct {
	sandboxpool.Provider
	n atomic.Int64
}

func (p *endedKills) Kill(ctx context.Context, id string) error {
	defer p.n.Add(1)
	return p.Provider.Kill(ctx, id)
}

// passHook is a go-redis hook that passes every call through: the test
// hooks embed it and replace what they watch.
type passHook struct{}

func (passHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (passHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (passHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
