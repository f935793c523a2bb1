//go:build soak

package sandboxpool_test

// The soak: several Managers against a real redis-server and the fake E2B
// over HTTP, driven through phases of injected faults (E2B 5xx/429/latency,
// an E2B outage, E2B's sandbox proxy down, hung sandboxes, Redis restarts,
// a Redis stall, Redis out of memory, one Manager cut off from Redis,
// create-lock expiry, Manager restarts), checking the invariants after each
// phase. Run: make soak DURATION=60s.

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	"github.com/sandboxpool/sandboxpool/internal/redistest"
)

var (
	soakDuration = flag.Duration("soak.duration", 60*time.Second, "total soak time")
	soakOnly     = flag.String("soak.phases", "", "run only the phases whose names contain one of these comma-separated words (steady always runs first)")
)

const (
	soakManagers = 4
	soakWorkers  = 16
	soakPairs    = 60
	soakIdle     = 3 * time.Second // short, so reaping is exercised and checked
	// soakRemoveEvery makes one of each worker's requests in this many a
	// Remove of a random pair, as a service's DELETE would: it races the
	// other workers' Acquires of the pair on every manager, under each
	// phase's faults.
	soakRemoveEvery = 200
	// soakUnresponsive is the soak's UnresponsiveAfter: short next to a
	// phase, so the sandboxes hung in a phase are condemned within it.
	soakUnresponsive = time.Second
	// soakRecover bounds how long after a phase a manager may take to
	// serve a pair a sandbox that the fake runs and that answers. One that
	// died during the phase (removed on an instance that did not hear,
	// expired during an outage) is found at its next probe, due within
	// HealthCheckAfter (1 s), and replaced; one that hung is condemned
	// UnresponsiveAfter (1 s) after its first failing probe; and the
	// replacement's create may meet a lock held by another instance. Half
	// of MaxAge: a pair does not recover by its sandbox's rotation alone.
	soakRecover = soakMaxAge / 2
	// soakQuota is every manager's MaxSandboxes and MaxPerUser, and
	// soakCreateRate its CreateLimit per user a second: each four times or
	// more what the load can hold or make (a window of soakPairs pairs,
	// their users' share of it, the pairs the create-lock phase's churn
	// adds while old ones idle out; a few creates a second per user). So
	// the quota scripts and the rate limiter run through every fault, a
	// refusal means places or tokens leaked, and the keys they write are
	// among those that must be gone after close.
	soakQuota      = 4 * soakPairs
	soakCreateRate = 1000
)

type soakPhase struct {
	name  string
	fault func(ctx context.Context, s *soak)
	// check, if set, runs after the phase has settled and returns a line
	// for the report and the invariants the phase broke.
	check func(s *soak) (report string, broken []string)
}

type soak struct {
	t     *testing.T
	redis *redistest.Server
	// link carries the first Manager's Redis traffic (see cutSlot), so
	// that a phase can cut that Manager alone off from Redis.
	link   *redistest.Link
	fake   *e2btest.Server
	client *e2b.Client
	mu     sync.Mutex
	ms     []*sandboxpool.Manager
	// rdbs are the open managers' own Redis clients. Config.Redis stays
	// the caller's, so the soak closes a manager's client once the manager
	// closed, as a service would (see closeManager).
	rdbs map[*sandboxpool.Manager]*redis.Client // guarded by mu

	errs   sync.Map // kind → *atomic.Int64
	served atomic.Int64
	// servedGone counts Acquires served a sandbox the fake no longer runs
	// (removed on another instance, announced but not heard yet, or not
	// heard at all across a partition), looked up as Acquire returns.
	servedGone atomic.Int64
	removed    atomic.Int64         // Removes that returned nil
	churn      atomic.Int64         // the load's pairs are churn … churn+soakPairs-1
	hung       map[string][2]string // sandboxes hung by the soak → their pair; guarded by mu
	// servedHung counts Acquires served a hung sandbox (before its first
	// failing probe on that instance: a reconnect, or a memory hit on a
	// recent check); each calls Lease.Recheck.
	servedHung atomic.Int64
	// cutBefore is the cut-off manager's Stats as its phase began.
	cutBefore sandboxpool.Stats
	// before is the managers' summed counters (see sumStats) as the
	// current phase began, for the phases whose checks read them;
	// proxyDownFor is how long the sandbox proxy was down, and oomOpened
	// is set if a breaker opened while Redis refused writes.
	before       sandboxpool.Stats
	proxyDownFor time.Duration
	oomOpened    atomic.Bool
	// closeErrs are Close failures: background work still running when the
	// close deadline passed. Recorded, not fatal, so the table still prints.
	closeErrs []string // guarded by mu
	// warns counts the Managers' Warn lines (and above) by message, and
	// faults the independent faults injected (a sandbox hung, an E2B call
	// failed, a create lock deleted), each of which may be news of its own.
	warns  warnCounter
	faults atomic.Int64
}

// warnCounter is a slog.Handler that counts the records at Warn and above
// by message, and keeps nothing else.
type warnCounter struct {
	mu sync.Mutex
	n  map[string]int64
}

func (c *warnCounter) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (c *warnCounter) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	if c.n == nil {
		c.n = map[string]int64{}
	}
	c.n[r.Message]++
	c.mu.Unlock()
	return nil
}
func (c *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *warnCounter) WithGroup(string) slog.Handler      { return c }

// take returns the counts since the last take, and their total.
func (c *warnCounter) take() (map[string]int64, int64) {
	c.mu.Lock()
	n := c.n
	c.n = nil
	c.mu.Unlock()
	var total int64
	for _, v := range n {
		total += v
	}
	return n, total
}

// countsByMessage lists n's messages, the most frequent first, with their
// counts.
func countsByMessage(n map[string]int64) string {
	msgs := slices.SortedFunc(maps.Keys(n), func(a, b string) int { return cmp.Or(cmp.Compare(n[b], n[a]), strings.Compare(a, b)) })
	parts := make([]string, len(msgs))
	for i, m := range msgs {
		parts[i] = fmt.Sprintf("%d× %q", n[m], strings.TrimPrefix(m, "sandboxpool: "))
	}
	return strings.Join(parts, ", ")
}

// soakWarnsPerManager bounds the Warn lines a phase may make per Manager,
// beyond one per independent fault it injected (soak.faults: a sandbox
// hung, one E2B call failed, a create lock deleted). A fault that meets
// every sandbox (an outage, a restart) is news once per Manager, at its
// start (and for some at its end), not once per sandbox: the first soak
// that counted them found 22 to 77 Warn lines in each of four phases, one
// per sandbox (a keepalive failing on Redis before the breaker opened; a
// Remove without its lock), per pair converging after an outage (a
// sandbox superseded), or per breaker try (open → half-open → open), and
// the first 5-minute one 99 in the proxy-down phase, one per canary.
const soakWarnsPerManager = 10

// soakCloseTimeout bounds a Manager's Close: longer than the CreateTimeout
// of newManager, so a create in flight may finish before Close gives up.
const soakCloseTimeout = 15 * time.Second

// closeManager closes m, recording a failure, then its Redis client: Close
// returns once m's background work has stopped, cut short or not.
func (s *soak) closeManager(m *sandboxpool.Manager) {
	ctx, cancel := context.WithTimeout(context.Background(), soakCloseTimeout)
	defer cancel()
	err := m.Close(ctx)
	s.mu.Lock()
	rdb := s.rdbs[m]
	delete(s.rdbs, m)
	if err != nil {
		s.closeErrs = append(s.closeErrs, err.Error())
	}
	s.mu.Unlock()
	_ = rdb.Close()
}

// cutSlot is the Manager slot whose Redis traffic goes through s.link.
const cutSlot = 0

// newManager builds the Manager for slot (of soakManagers).
func (s *soak) newManager(slot int) *sandboxpool.Manager {
	addr := s.redis.Addr
	if slot == cutSlot {
		addr = s.link.Addr
	}
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, MaxRetries: -1, DialTimeout: 200 * time.Millisecond,
		ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond})
	cfg := sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(s.client), Redis: rdb, Namespace: "soak",
		IdleTimeout: soakIdle, MaxAge: soakMaxAge, HealthCheckAfter: time.Second, UnresponsiveAfter: soakUnresponsive,
		ReapInterval: 100 * time.Millisecond, LockTTL: time.Second, CreateTimeout: 10 * time.Second, Logger: slog.New(&s.warns),
		MaxSandboxes: soakQuota, MaxPerUser: soakQuota, CreateLimit: sandboxpool.RateLimit{Rate: soakCreateRate}}
	sandboxpool.FastRedisRecovery(&cfg, 200*time.Millisecond)
	m, err := sandboxpool.New(cfg)
	if err != nil { // a fixed, valid config: New cannot fail (and this may run off the test goroutine)
		panic(err)
	}
	s.mu.Lock()
	s.rdbs[m] = rdb
	s.mu.Unlock()
	return m
}

func (s *soak) manager(i int) *sandboxpool.Manager {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ms[i%len(s.ms)]
}

// refusedKind is the error kind of the quota's and rate limit's refusals,
// which the soak's load never earns (see soakQuota).
const refusedKind = "refused by a quota or the create limit"

func (s *soak) countErr(err error) {
	kind := "other"
	var ae *e2b.APIError
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		kind = "timeout"
	case errors.Is(err, sandboxpool.ErrClosed):
		kind = "closed (manager restart)"
	case errors.As(err, &ae):
		kind = fmt.Sprintf("e2b %d", ae.StatusCode)
	case errors.Is(err, e2b.ErrOutcomeUnknown):
		kind = "e2b outcome unknown"
	case errors.Is(err, sandboxpool.ErrSandboxUnresponsive):
		kind = "sandbox unresponsive"
	case errors.Is(err, e2b.ErrUnreachable):
		kind = "e2b unreachable"
	case errors.Is(err, sandboxpool.ErrUnavailable):
		kind = "unavailable (Redis, or create locks lost)"
	case errors.Is(err, sandboxpool.ErrQuotaExceeded), errors.Is(err, sandboxpool.ErrRateLimited):
		kind = refusedKind
	}
	v, _ := s.errs.LoadOrStore(kind, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

// load runs the workers until ctx ends.
func (s *soak) load(ctx context.Context) {
	var wg sync.WaitGroup
	for w := range soakWorkers {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				pair := int(s.churn.Load()) + rand.IntN(soakPairs)
				user, project := fmt.Sprint("u", pair%7), fmt.Sprint("p", pair)
				rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				if i%soakRemoveEvery == soakRemoveEvery-1 {
					if err := s.manager(w+i).Remove(rctx, user, project); err != nil {
						s.countErr(err)
					} else {
						s.removed.Add(1)
					}
					cancel()
					continue
				}
				l, err := s.manager(w+i).Acquire(rctx, user, project)
				cancel()
				if err != nil {
					s.countErr(err)
					continue
				}
				s.served.Add(1)
				if _, running := s.fake.StartedAt(l.Sandbox().ID); !running {
					s.servedGone.Add(1)
				}
				time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond) // use it
				if s.isHung(l.Sandbox().ID) {
					// Its envd calls failed, as a handler's would: ask for a
					// probe before the pair's next hand-out.
					s.servedHung.Add(1)
					l.Recheck()
				}
				l.Release()
			}
		})
	}
	wg.Wait()
}

const (
	soakMaxAge = 4 * soakIdle
	// soakConverge bounds how long live duplicates may outlast a phase: a
	// holder of a duplicate finds it superseded at its next keepalive
	// (within 3/4 IdleTimeout) and stops extending it, so it dies within
	// IdleTimeout/2 more.
	soakConverge = 2 * soakIdle
	// soakDrain bounds how long a sandbox may run past MaxAge: never handed
	// out after it, so its last keepalive pushes it at most IdleTimeout/2;
	// E2B rounds that up to whole seconds (+1 s), and in the E2B-fault phase
	// the client may resend it after a retry wait (MaxRetryWait, 1 s) and an
	// injected latency (0.3 s); plus a reap tick.
	soakDrain = soakIdle/2 + 2*time.Second + 500*time.Millisecond
)

// managerLoops are the loops a Manager with Redis runs from New until
// Close, each on a goroutine of its own.
var managerLoops = []string{"(*clock).run", "(*Manager).reapLoop", "(*Manager).probeLoop", "(*Manager).removalLoop", "(*Manager).checkEviction"}

// loopsAmiss checks that each of managerLoops runs on exactly one goroutine
// per open Manager: fewer is a loop that returned early (a probe loop that
// quit after an outage, say), more is a closed Manager's loop that outlived
// its Close. It reports each loop whose count is off.
func loopsAmiss(open int) []string {
	counts := make([]int, len(managerLoops))
	for _, g := range sandboxpool.GoroutineStacks() {
		for i, f := range managerLoops {
			if strings.Contains(g, "github.com/sandboxpool/sandboxpool."+f+"(") {
				counts[i]++
			}
		}
	}
	var amiss []string
	for i, f := range managerLoops {
		if counts[i] != open {
			amiss = append(amiss, fmt.Sprintf("%d goroutines run %s, one per open Manager (%d) expected", counts[i], f, open))
		}
	}
	return amiss
}

// settledLoops is loopsAmiss once it holds, or after a second: the loops
// of a Manager made just before the phase ended may not have been
// scheduled yet.
func settledLoops(open int) []string {
	deadline := time.Now().Add(time.Second)
	for {
		amiss := loopsAmiss(open)
		if len(amiss) == 0 || time.Now().After(deadline) {
			return amiss
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// census is one look at the fake. A live duplicate is a pair's running
// sandbox younger than MaxAge beyond the first. A sandbox past MaxAge is
// draining (never handed out again), not a duplicate; one running past
// MaxAge+soakDrain is overdue.
type census struct {
	dups    int
	detail  []string      // each pair with live duplicates, and the sandbox Redis names
	overdue []string      // overdue sandboxes, described
	drain   time.Duration // the longest any running sandbox is past MaxAge
}

func (s *soak) census() (c census) {
	now := time.Now()
	live := map[[2]string][]string{}
	for _, id := range s.fake.Running() {
		started, ok := s.fake.StartedAt(id)
		if !ok {
			continue
		}
		if past := now.Sub(started) - soakMaxAge; past >= 0 {
			c.drain = max(c.drain, past)
			if past > soakDrain {
				c.overdue = append(c.overdue, s.describe(id))
			}
			continue
		}
		md := s.fake.Metadata(id)
		k := [2]string{md["sandboxpool.user"], md["sandboxpool.project"]}
		live[k] = append(live[k], id)
	}
	for k, ids := range live {
		if len(ids) < 2 {
			continue
		}
		c.dups += len(ids) - 1
		var each []string
		for _, id := range ids {
			each = append(each, s.describe(id))
		}
		c.detail = append(c.detail, fmt.Sprintf("%s/%s: running [%s], Redis names %q", k[0], k[1], strings.Join(each, ", "), s.recordID(k)))
	}
	return c
}

// recordID is the sandbox the pair's Redis record names.
func (s *soak) recordID(k [2]string) string {
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.redis.Addr})
	defer rdb.Close()
	id, _ := rdb.HGet(context.Background(), "soak:{"+k[0]+":"+k[1]+"}:sbx", "id").Result()
	return id
}

// describe names a sandbox with its age and the time left to its deadline.
func (s *soak) describe(id string) string {
	started, _ := s.fake.StartedAt(id)
	end, _ := s.fake.EndAt(id)
	now := time.Now()
	return fmt.Sprintf("%s (age %v, deadline in %v)", id, now.Sub(started).Round(time.Millisecond), end.Sub(now).Round(time.Millisecond))
}

// drains accumulates censuses: the longest drain seen and every overdue
// sandbox, once.
type drains struct {
	longest time.Duration
	overdue []string
	seen    map[string]bool
}

func (d *drains) add(c census) {
	d.longest = max(d.longest, c.drain)
	for _, o := range c.overdue {
		if id, _, _ := strings.Cut(o, " "); !d.seen[id] {
			d.seen[id] = true
			d.overdue = append(d.overdue, o)
		}
	}
}

// watch takes a census every 100 ms until ctx ends, so drains are checked
// while the load runs, not only after it.
func (s *soak) watch(ctx context.Context, d *drains) {
	for ctx.Err() == nil {
		d.add(s.census())
		sleep(ctx, 100*time.Millisecond)
	}
}

// settle waits, up to soakConverge, for live duplicates to converge; it
// returns how long that took and the last census, and adds every census to d.
func (s *soak) settle(d *drains) (took time.Duration, last census) {
	start := time.Now()
	for {
		last = s.census()
		d.add(last)
		took = time.Since(start)
		if last.dups == 0 || took >= soakConverge {
			return took, last
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestSoak(t *testing.T) {
	s := &soak{t: t, redis: redistest.Start(t), hung: map[string][2]string{}, rdbs: map[*sandboxpool.Manager]*redis.Client{}}
	s.link = redistest.StartLink(t, s.redis.Addr, 0)
	s.fake = e2btest.Start(e2btest.Config{MaxConcurrent: 500})
	defer s.fake.Close()
	opts := s.fake.ClientOptions()
	opts.MaxRetryWait = time.Second
	var err error
	s.client, err = e2b.New(opts)
	require.NoError(t, err)
	for range soakManagers {
		s.ms = append(s.ms, s.newManager(len(s.ms)))
	}
	goroutinesAtStart := runtime.NumGoroutine()

	phases := []soakPhase{
		{"steady", nil, nil},
		{"e2b faults (5xx, 429, latency, drops)", func(ctx context.Context, s *soak) {
			ops := []e2btest.Op{e2btest.OpCreate, e2btest.OpConnect, e2btest.OpHealth, e2btest.OpTimeout, e2btest.OpList}
			faults := []e2btest.Fault{{Status: 503}, {Status: 502}, {Status: 429, RetryAfter: time.Second}, {Latency: 300 * time.Millisecond},
				{Drop: true}, {Status: 504, AfterEffect: true}, {Status: 500}}
			// At most one fault waits per operation, so the phase is the
			// same rate of faults however long it lasts (queued at 50 a
			// second, faster than the calls come, they piled up and made a
			// long phase an outage), and none is left for the next phase.
			for ctx.Err() == nil {
				if op := ops[rand.IntN(len(ops))]; s.fake.Pending(op) == 0 {
					s.fake.Inject(op, faults[rand.IntN(len(faults))])
					s.faults.Add(1)
				}
				time.Sleep(20 * time.Millisecond)
			}
			s.fake.ClearFaults()
		}, nil},
		{"e2b outage (every call 503)", func(ctx context.Context, s *soak) {
			sleep(ctx, 300*time.Millisecond)
			s.fake.Down(e2btest.Fault{Status: 503}) // past IdleTimeout: keepalives fail, and every deadline passes
			sleep(ctx, soakIdle+500*time.Millisecond)
			s.fake.Up()
		}, nil},
		{"e2b sandbox proxy down (every envd 502)", func(ctx context.Context, s *soak) {
			s.before = s.sumStats()
			sleep(ctx, 300*time.Millisecond)
			s.fake.ProxyDown() // every sandbox hangs, those created meanwhile too
			start := time.Now()
			<-ctx.Done()
			s.fake.ProxyUp()
			s.proxyDownFor = time.Since(start)
		}, (*soak).recoverFromProxy},
		{"hung sandboxes", func(ctx context.Context, s *soak) {
			s.before = s.sumStats()
			for ctx.Err() == nil {
				s.hangOne()
				sleep(ctx, 200*time.Millisecond)
			}
		}, (*soak).recoverHung},
		{"redis restart", func(ctx context.Context, s *soak) {
			sleep(ctx, 300*time.Millisecond)
			s.redis.Stop()
			sleep(ctx, time.Second)
			s.redis.Start()
		}, nil},
		{"redis stall", func(ctx context.Context, s *soak) {
			sleep(ctx, 300*time.Millisecond)
			s.redis.Pause() // accepts connections, answers nothing
			sleep(ctx, 1500*time.Millisecond)
			s.redis.Resume()
		}, nil},
		{"redis out of memory (writes refused)", func(ctx context.Context, s *soak) {
			rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.redis.Addr})
			defer rdb.Close()
			s.before = s.sumStats()
			sleep(ctx, 300*time.Millisecond)
			// Past maxmemory under noeviction: reads answered, every write
			// refused (OOM). The Background context: the limit must be
			// lifted even if the phase has ended.
			if err := rdb.ConfigSet(context.Background(), "maxmemory", "1").Err(); err != nil {
				panic(err)
			}
			for end := time.Now().Add(1500 * time.Millisecond); ctx.Err() == nil && time.Now().Before(end); sleep(ctx, 50*time.Millisecond) {
				for i := range soakManagers {
					if s.manager(i).Stats().RedisDegraded {
						s.oomOpened.Store(true)
					}
				}
			}
			if err := rdb.ConfigSet(context.Background(), "maxmemory", "0").Err(); err != nil {
				panic(err)
			}
		}, (*soak).afterOutOfMemory},
		{"redis cut off from one manager", func(ctx context.Context, s *soak) {
			s.cutBefore = s.manager(cutSlot).Stats()
			sleep(ctx, 300*time.Millisecond)
			s.link.Cut() // its connections die silently; the other managers keep Redis
			sleep(ctx, 1500*time.Millisecond)
			s.link.Heal()
		}, (*soak).agreeAfterCut},
		{"create-lock expiry", func(ctx context.Context, s *soak) {
			rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.redis.Addr})
			defer rdb.Close()
			var wg sync.WaitGroup
			defer wg.Wait()
			wg.Go(func() { // new pairs keep arriving, so creates race for locks that vanish
				for ctx.Err() == nil {
					s.churn.Add(1)
					sleep(ctx, 100*time.Millisecond)
				}
			})
			for ctx.Err() == nil {
				keys, _ := rdb.Keys(ctx, "soak:*:lock").Result()
				if len(keys) > 0 {
					rdb.Del(ctx, keys...)
					s.faults.Add(int64(len(keys))) // each a create that may lose its lock
				}
				time.Sleep(10 * time.Millisecond)
			}
		}, nil},
		{"manager restarts", func(ctx context.Context, s *soak) {
			for i := 0; ctx.Err() == nil; i++ {
				sleep(ctx, 500*time.Millisecond)
				slot := i % soakManagers
				fresh := s.newManager(slot)
				s.mu.Lock()
				old := s.ms[slot]
				s.ms[slot] = fresh
				s.mu.Unlock()
				s.closeManager(old)
			}
		}, nil},
	}
	phases = selectPhases(phases, *soakOnly)
	per := *soakDuration / time.Duration(len(phases))
	type row struct {
		phase            string
		served, removed  int64
		servedGone       int64
		servedRunning    time.Duration // after the phase, the longest a pair waited for a running sandbox
		failed           int64
		creates, kills   int64 // at the fake
		requests         int64 // every request that reached the fake, API and envd, faulted ones included
		converged        time.Duration
		dupsLeft         int
		drain            time.Duration // the longest a sandbox ran past MaxAge
		running, goroutn int
		warns            int64 // Warn lines, every Manager's
	}
	var rows []row
	var reports []string
	broken := []string{}
	for _, ph := range phases {
		ctx, cancel := context.WithTimeout(context.Background(), per)
		faultsBefore := s.faults.Load()
		before, removedBefore, goneBefore := s.served.Load(), s.removed.Load(), s.servedGone.Load()
		failedBefore := s.totalErrs()
		createsBefore, killsBefore, requestsBefore := s.fake.Calls(e2btest.OpCreate), s.fake.Calls(e2btest.OpKill), s.fake.Requests()
		var fw sync.WaitGroup
		if ph.fault != nil {
			fw.Go(func() { ph.fault(ctx, s) })
		}
		d := &drains{seen: map[string]bool{}}
		fw.Go(func() { s.watch(ctx, d) })
		s.load(ctx)
		cancel()
		fw.Wait()
		took, last := s.settle(d)
		r := row{phase: ph.name, served: s.served.Load() - before, servedGone: s.servedGone.Load() - goneBefore, removed: s.removed.Load() - removedBefore, failed: s.totalErrs() - failedBefore,
			creates: s.fake.Calls(e2btest.OpCreate) - createsBefore, kills: s.fake.Calls(e2btest.OpKill) - killsBefore, requests: s.fake.Requests() - requestsBefore,
			converged: took, dupsLeft: last.dups, drain: d.longest, running: len(s.fake.Running()), goroutn: runtime.NumGoroutine()}
		rows = append(rows, r)
		if r.dupsLeft > 0 {
			broken = append(broken, fmt.Sprintf("%s: %d live duplicate sandboxes still running %v after the phase: %v", ph.name, r.dupsLeft, soakConverge, last.detail))
		}
		if len(d.overdue) > 0 {
			broken = append(broken, fmt.Sprintf("%s: %d sandboxes running more than %v past MaxAge: %v", ph.name, len(d.overdue), soakDrain, d.overdue))
		}
		if r.served == 0 {
			broken = append(broken, ph.name+": nothing served")
		}
		for _, msg := range settledLoops(soakManagers) {
			broken = append(broken, ph.name+": "+msg)
		}
		if ph.check != nil {
			report, b := ph.check(s)
			reports = append(reports, ph.name+": "+report)
			for _, msg := range b {
				broken = append(broken, ph.name+": "+msg)
			}
		}
		var b []string
		rows[len(rows)-1].servedRunning, b = s.servedRunning()
		for _, msg := range b {
			broken = append(broken, ph.name+": "+msg)
		}
		// The phase's Warn lines, its recovery's included.
		warns, n := s.warns.take()
		rows[len(rows)-1].warns = n
		if n > 0 {
			reports = append(reports, fmt.Sprintf("%s: warn lines: %s", ph.name, countsByMessage(warns)))
		}
		if faults := s.faults.Load() - faultsBefore; n > soakWarnsPerManager*soakManagers+faults {
			broken = append(broken, fmt.Sprintf("%s: %d Warn lines from %d managers, more than %d each and one per fault injected (%d): %s",
				ph.name, n, soakManagers, soakWarnsPerManager, faults, countsByMessage(warns)))
		}
	}

	// Close everything: the fake must be empty once deadlines pass (aligned
	// deadlines), and Redis must hold no key.
	for _, m := range s.ms {
		s.closeManager(m)
	}
	for _, err := range s.closeErrs {
		broken = append(broken, "close: "+err)
	}
	deadline := time.Now().Add(soakMaxAge + 2*time.Second)
	for time.Now().Before(deadline) && len(s.fake.Running()) > 0 {
		time.Sleep(100 * time.Millisecond)
	}
	leaked := len(s.fake.Running())
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.redis.Addr})
	keys, _ := rdb.Keys(context.Background(), "*soak:*").Result() // the create limit's too: redis_rate prefixes them rate:
	left := make([]string, len(keys))
	for i, k := range keys {
		left[i] = describeKey(rdb, k)
	}
	_ = rdb.Close()
	if leaked > 0 {
		broken = append(broken, fmt.Sprintf("%d sandboxes outlived their deadline after every manager closed", leaked))
	}
	if len(keys) > 0 {
		broken = append(broken, fmt.Sprintf("%d Redis keys left after every deadline passed: %s", len(keys), strings.Join(left, ", ")))
	}
	if v, ok := s.errs.Load(refusedKind); ok {
		broken = append(broken, fmt.Sprintf("%d Acquires %s set above anything the load holds or makes: places or tokens leaked", v.(*atomic.Int64).Load(), refusedKind))
	}
	s.client.CloseIdleConnections()
	time.Sleep(200 * time.Millisecond)
	extraGoroutines := runtime.NumGoroutine() - goroutinesAtStart

	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintf(w, "phase\tserved\tserved gone\tall served running in\tremoved\tfailed\tcreates\tkills\te2b requests\tduplicates converged in\tleft\tlongest past MaxAge\twarn lines\trunning at fake\tgoroutines\n")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%d\t%d\t%v\t%d\t%d\t%d\t%d\t%d\t%v\t%d\t%v\t%d\t%d\t%d\n", r.phase, r.served, r.servedGone, r.servedRunning.Round(100*time.Millisecond), r.removed, r.failed, r.creates, r.kills, r.requests, r.converged.Round(100*time.Millisecond), r.dupsLeft, r.drain.Round(100*time.Millisecond), r.warns, r.running, r.goroutn)
	}
	fmt.Fprintf(w, "after close\t\t\t\t\t\t\t\t\t\t\t\t\t%d leaked\t%+d vs start\n", leaked, extraGoroutines)
	w.Flush()
	fmt.Printf("errors by kind: %s\n", s.errSummary())
	fmt.Printf("redis keys left: %d; fake requests: %d\n", len(keys), s.fake.Requests())
	for _, r := range reports {
		fmt.Println(r)
	}
	if len(broken) > 0 {
		t.Fatalf("soak invariants broken:\n- %s", strings.Join(broken, "\n- "))
	}
}

// describeKey names a key left in Redis with its expiry and, for a quota
// set, its places, each with its expiry: what tells a place that outlives
// its sandbox from one of a sandbox still running.
func describeKey(rdb *redis.Client, key string) string {
	ctx := context.Background()
	ttl, _ := rdb.PTTL(ctx, key).Result()
	desc := fmt.Sprintf("%s (expires in %v", key, ttl)
	if places, err := rdb.ZRangeWithScores(ctx, key, 0, -1).Result(); err == nil {
		now := time.Now().UnixMilli()
		for _, p := range places {
			desc += fmt.Sprintf("; %v in %+dms", p.Member, int64(p.Score)-now)
		}
	}
	return desc + ")"
}

// await calls try every 50 ms until it reports true or bound has passed;
// it returns how long that took and whether try succeeded.
func await(bound time.Duration, try func() bool) (time.Duration, bool) {
	begin := time.Now()
	for {
		if try() {
			return time.Since(begin), true
		}
		if time.Since(begin) >= bound {
			return time.Since(begin), false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// servedRunning asks every manager for every pair of the load until it is
// served a sandbox the fake runs and that answers. It returns the longest
// wait, and each pair a manager did not serve one within soakRecover.
func (s *soak) servedRunning() (longest time.Duration, broken []string) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	churn := int(s.churn.Load())
	for i := range soakManagers {
		m := s.manager(i)
		for pair := churn; pair < churn+soakPairs; pair++ {
			user, project := fmt.Sprint("u", pair%7), fmt.Sprint("p", pair)
			wg.Go(func() {
				var got string
				took, ok := await(soakRecover, func() bool {
					got = servedID(m, user, project)
					_, running := s.fake.StartedAt(got)
					return running && !s.isHung(got)
				})
				mu.Lock()
				defer mu.Unlock()
				longest = max(longest, took)
				if !ok {
					broken = append(broken, fmt.Sprintf("manager %d served %s/%s %q for %v after the phase, not a sandbox the fake runs and that answers", i, user, project, got, soakRecover))
				}
			})
		}
	}
	wg.Wait()
	return longest, broken
}

// soakAgree bounds how long after its phase the manager cut off from
// Redis may take to close its breaker and to serve every pair the sandbox
// another manager serves: Redis is probed every 200 ms, the sandboxes it
// created alone are published (or superseded, when another was published
// for the pair meanwhile) at once, and its removal subscription is found
// dead within a second and replaced, which has what it holds rechecked.
const soakAgree = soakIdle

// agreeAfterCut checks that the manager cut off from Redis comes back: its
// breaker closes, and for every pair of the load it serves the sandbox
// another manager serves, so memory and Redis did not drift apart across
// the partition.
func (s *soak) agreeAfterCut() (string, []string) {
	cut, other := s.manager(cutSlot), s.manager(cutSlot+1)
	var broken []string
	during := cut.Stats()
	if during.RedisErrors == s.cutBefore.RedisErrors {
		broken = append(broken, "the cut-off manager counted no Redis error: the cut did not reach it")
	}
	start := time.Now()
	for cut.Stats().RedisDegraded && time.Since(start) < soakAgree {
		time.Sleep(20 * time.Millisecond)
	}
	closedIn := time.Since(start)
	if cut.Stats().RedisDegraded {
		broken = append(broken, fmt.Sprintf("its breaker was still open %v after the phase", soakAgree))
	}
	agreed, longest, failed := s.eachPair(soakAgree, func(user, project string) (bool, string) {
		a, b := servedID(cut, user, project), servedID(other, user, project)
		return a != "" && a == b, fmt.Sprintf("the cut-off manager serves %q, another %q", a, b)
	})
	broken = append(broken, failed...)
	return fmt.Sprintf("%d Redis errors and %d creates without the lock on the cut-off manager; its breaker closed %v after the phase; %d of %d pairs served the same sandbox by it and by another manager, the longest in %v",
		during.RedisErrors-s.cutBefore.RedisErrors, during.DegradedCreates-s.cutBefore.DegradedCreates, closedIn.Round(10*time.Millisecond),
		agreed, soakPairs, longest.Round(10*time.Millisecond)), broken
}

// hangOne hangs a random running sandbox the soak has not hung yet: E2B
// keeps reporting it running while its envd answers 502.
func (s *soak) hangOne() {
	running := s.fake.Running()
	rand.Shuffle(len(running), func(i, j int) { running[i], running[j] = running[j], running[i] })
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range running {
		if _, done := s.hung[id]; !done {
			md := s.fake.Metadata(id)
			s.fake.Hang(id)
			s.faults.Add(1)
			s.hung[id] = [2]string{md["sandboxpool.user"], md["sandboxpool.project"]}
			return
		}
	}
}

func (s *soak) isHung(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.hung[id]
	return ok
}

// recoverHung checks that every pair whose sandbox the soak hung is served
// a sandbox that answers again within soakRecover, by Acquires on one
// manager (a hung sandbox served meanwhile is released and asked again),
// and reports how many sandboxes were condemned.
func (s *soak) recoverHung() (string, []string) {
	s.mu.Lock()
	hung := maps.Clone(s.hung)
	s.mu.Unlock()
	pairs := map[[2]string]bool{}
	for _, k := range hung {
		pairs[k] = true
	}
	var (
		mu        sync.Mutex
		longest   time.Duration
		recovered int
		broken    []string
		wg        sync.WaitGroup
	)
	for k := range pairs {
		wg.Go(func() {
			took, ok := await(soakRecover, func() bool {
				id := servedID(s.manager(0), k[0], k[1])
				_, isHung := hung[id]
				return id != "" && !isHung
			})
			mu.Lock()
			defer mu.Unlock()
			if !ok {
				broken = append(broken, fmt.Sprintf("%s/%s was not served a sandbox that answers within %v", k[0], k[1], soakRecover))
				return
			}
			recovered++
			longest = max(longest, took)
		})
	}
	wg.Wait()
	after := s.sumStats()
	condemned, spared := after.Unresponsive-s.before.Unresponsive, after.Spared-s.before.Spared
	switch {
	case len(hung) == 0:
		broken = append(broken, "no sandbox was hung")
	case condemned == 0:
		broken = append(broken, fmt.Sprintf("none of the %d hung sandboxes was condemned", len(hung)))
	}
	return fmt.Sprintf("%d sandboxes hung, %d condemned (Stats.Unresponsive), %d condemnations spared (Stats.Spared: 3 or more hung, none answering), %d Acquires served a hung sandbox (each then rechecked), %d of %d pairs served an answering sandbox after the phase, the longest in %v",
		len(hung), condemned, spared, s.servedHung.Load(), recovered, len(pairs), longest.Round(100*time.Millisecond)), broken
}

// eachPair waits, for every pair of the load at once, until try reports
// the pair served as it should be, or bound has passed. It returns how
// many pairs were, the longest wait, and a line for each that was not,
// with what try said of its last attempt.
func (s *soak) eachPair(bound time.Duration, try func(user, project string) (bool, string)) (done int, longest time.Duration, broken []string) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	churn := int(s.churn.Load())
	for pair := churn; pair < churn+soakPairs; pair++ {
		user, project := fmt.Sprint("u", pair%7), fmt.Sprint("p", pair)
		wg.Go(func() {
			var why string
			took, ok := await(bound, func() (ok bool) {
				ok, why = try(user, project)
				return ok
			})
			mu.Lock()
			defer mu.Unlock()
			if !ok {
				broken = append(broken, fmt.Sprintf("%s/%s: %s, %v after the phase", user, project, why, bound))
				return
			}
			done++
			longest = max(longest, took)
		})
	}
	wg.Wait()
	return done, longest, broken
}

// sumStats sums over the managers the counters the phases' checks read:
// Unresponsive, Spared, DegradedCreates and RedisErrors.
func (s *soak) sumStats() (sum sandboxpool.Stats) {
	for i := range soakManagers {
		st := s.manager(i).Stats()
		sum.Unresponsive += st.Unresponsive
		sum.Spared += st.Spared
		sum.DegradedCreates += st.DegradedCreates
		sum.RedisErrors += st.RedisErrors
	}
	return sum
}

// afterOutOfMemory checks that Redis refusing writes made creates go
// without the lock (it held them up, before) and that no manager took it
// for an outage: the breakers stayed closed, so reads went on finding the
// other managers' sandboxes. Duplicates, what is left and recovery are the
// phase's common checks.
func (s *soak) afterOutOfMemory() (string, []string) {
	after := s.sumStats()
	degraded, errs := after.DegradedCreates-s.before.DegradedCreates, after.RedisErrors-s.before.RedisErrors
	var broken []string
	if errs == 0 {
		broken = append(broken, "no Redis call was refused: the phase did not reach the managers")
	}
	if degraded == 0 {
		broken = append(broken, "no create went without the lock while Redis refused writes")
	}
	if s.oomOpened.Load() {
		broken = append(broken, "a manager's breaker opened: Redis refusing writes was taken for an outage, and the reads it answered were refused")
	}
	return fmt.Sprintf("%d Redis calls refused, %d creates without the lock", errs, degraded), broken
}

// recoverFromProxy checks that while every sandbox hung, the managers
// condemned no more than a canary each every UnresponsiveAfter (replacing
// the others would have met the same proxy, and destroyed what they held),
// and that every pair is served once the proxy is back.
func (s *soak) recoverFromProxy() (string, []string) {
	after := s.sumStats()
	condemned, spared := after.Unresponsive-s.before.Unresponsive, after.Spared-s.before.Spared
	canaries := int64(soakManagers) * (int64(s.proxyDownFor/soakUnresponsive) + 1)
	var broken []string
	if condemned > canaries {
		broken = append(broken, fmt.Sprintf("%d sandboxes condemned while the proxy was down for %v: more than a canary per manager every UnresponsiveAfter (%d)",
			condemned, s.proxyDownFor.Round(100*time.Millisecond), canaries))
	}
	if spared == 0 {
		broken = append(broken, "no condemnation was spared: the sandboxes never looked unresponsive together")
	}
	served, longest, failed := s.eachPair(soakRecover, func(user, project string) (bool, string) {
		return servedID(s.manager(0), user, project) != "", "not served once the proxy was back"
	})
	broken = append(broken, failed...)
	return fmt.Sprintf("proxy down %v: %d sandboxes condemned (at most %d canaries), %d condemnations spared; %d of %d pairs served after it, the longest in %v",
		s.proxyDownFor.Round(100*time.Millisecond), condemned, canaries, spared, served, soakPairs, longest.Round(100*time.Millisecond)), broken
}

// selectPhases keeps the first phase (steady) and those named in only.
func selectPhases(phases []soakPhase, only string) []soakPhase {
	if only == "" {
		return phases
	}
	kept := []soakPhase{phases[0]}
	for _, ph := range phases[1:] {
		for w := range strings.SplitSeq(only, ",") {
			if w != "" && strings.Contains(ph.name, w) {
				kept = append(kept, ph)
				break
			}
		}
	}
	return kept
}

func (s *soak) totalErrs() (n int64) {
	s.errs.Range(func(_, v any) bool { n += v.(*atomic.Int64).Load(); return true })
	return n
}

func (s *soak) errSummary() string {
	var parts []string
	s.errs.Range(func(k, v any) bool {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v.(*atomic.Int64).Load()))
		return true
	})
	sort.Strings(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
