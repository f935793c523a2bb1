package sandboxpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool/internal/redistest"
)

// stubProvider does nothing: these tests exercise the Manager's own
// goroutines, not a provider.
type stubProvider struct{}

func (stubProvider) Create(context.Context, CreateRequest) (Sandbox, error) {
	return Sandbox{ID: "i0"}, nil
}
func (stubProvider) Connect(_ context.Context, id string, _ time.Duration) (Sandbox, error) {
	return Sandbox{ID: id}, nil
}
func (stubProvider) Check(context.Context, Sandbox) error                       { return nil }
func (stubProvider) SetTimeout(context.Context, string, time.Duration) error    { return nil }
func (stubProvider) Kill(context.Context, string) error                         { return nil }
func (stubProvider) List(context.Context, map[string]string) ([]Sandbox, error) { return nil, nil }

// goroutineID is the calling goroutine's number, from its stack header.
func goroutineID() string {
	b := make([]byte, 64)
	return strings.Fields(string(b[:runtime.Stack(b, false)]))[1]
}

// workerStacks counts the goroutines running Manager.worker: all of them,
// and the idle ones (worker is their top frame: waiting for a job).
func workerStacks() (all, idle int) {
	for _, g := range GoroutineStacks() {
		if !strings.Contains(g, ".(*Manager).worker(") {
			continue
		}
		all++
		if lines := strings.SplitN(g, "\n", 3); len(lines) > 1 && strings.Contains(lines[1], ".(*Manager).worker(") {
			idle++
		}
	}
	return all, idle
}

// A background job goes to an idle worker (a goroutine whose stack earlier
// jobs grew) instead of a new goroutine; a worker idle for workerIdle
// exits; Close stops the idle ones.
func TestBackgroundWorkerIsReusedThenExits(t *testing.T) {
	m, err := New(Config{Provider: stubProvider{}, workerIdle: 300 * time.Millisecond})
	require.NoError(t, err)
	const loops = 2 // the clock and the reaper run on workers too (no Redis: no probe loop)
	require.Eventually(t, func() bool { all, _ := workerStacks(); return all == loops }, 5*time.Second, time.Millisecond)

	run := func() string {
		ran := make(chan string)
		require.True(t, m.goBackground(func() { ran <- goroutineID() }))
		return <-ran
	}
	first := run()
	require.Eventually(t, func() bool { _, idle := workerStacks(); return idle == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, first, run(), "the second job ran on a new goroutine, not on the idle worker")

	require.Eventually(t, func() bool { all, _ := workerStacks(); return all == loops }, 5*time.Second, 10*time.Millisecond,
		"an idle worker outlived workerIdle")

	run()
	require.Eventually(t, func() bool { _, idle := workerStacks(); return idle == 1 }, 5*time.Second, time.Millisecond)
	require.NoError(t, m.Close(context.Background()))
	all, _ := workerStacks()
	assert.Zero(t, all, "Close returned with workers still running")
}

// Every job goBackground accepted has run when Close returns, whether an
// idle worker or a new one took it, and none is accepted afterwards.
func TestBackgroundJobsAcceptedDuringCloseRun(t *testing.T) {
	m, err := New(Config{Provider: stubProvider{}})
	require.NoError(t, err)
	var accepted, ran atomic.Int64
	var callers sync.WaitGroup
	for range 8 {
		callers.Go(func() {
			for range 200 {
				if m.goBackground(func() { ran.Add(1) }) {
					accepted.Add(1)
				}
			}
		})
	}
	time.Sleep(time.Millisecond) // let some jobs find idle workers
	require.NoError(t, m.Close(context.Background()))
	ranAtClose := ran.Load()
	callers.Wait()
	assert.Equal(t, accepted.Load(), ranAtClose, "a job accepted before Close returned had not run, or one was accepted after")
	assert.Equal(t, ranAtClose, ran.Load(), "a job ran after Close returned")
	assert.False(t, m.goBackground(func() {}), "accepted after Close")
}

// A sandbox published on recovery (adopt) yields only to a record an
// Acquire could still be given: one past MaxAge, or whose creation time
// does not parse, is written over, as fromCache would treat it as none;
// and a keepalive (touch) reads such a record as none, not as another
// sandbox's. The scripts run on miniredis and on a real redis-server,
// whose Lua differ.
func TestRecordsPastMaxAgeNameNoSandbox(t *testing.T) {
	at := time.Now().Truncate(time.Millisecond)
	for name, addr := range map[string]func(t *testing.T) string{
		"miniredis": func(t *testing.T) string {
			mr := miniredis.RunT(t)
			mr.SetTime(at) // it keeps a TTL, not a time: a clock that moves would blur the expiry read back
			return mr.Addr()
		},
		"redis-server": func(t *testing.T) string { return redistest.Start(t).Addr },
	} {
		t.Run(name, func(t *testing.T) {
			rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr(t)})
			defer rdb.Close()
			m, err := New(Config{Provider: stubProvider{}, Redis: rdb, MaxAge: time.Hour, now: func() time.Time { return at }})
			require.NoError(t, err)
			defer m.Close(context.Background())
			ctx := context.Background()
			now := at.UnixNano()
			stale := now + m.guard - int64(time.Hour)
			k := pairKey{"u", "p"}
			key := m.store.sbxKey(k)
			ours := m.newSlot(k, Sandbox{ID: "iours"}, now, now, now+int64(time.Minute))
			for _, c := range []struct {
				name   string
				record []any // fields of the record there before, none if empty
				want   string
				touch  int64 // what a keepalive of ours reads
			}{
				{"none", nil, "iours", recordAbsent},
				{"younger than MaxAge", []any{fieldID, "iother", fieldCreated, nsToMs(stale) + 1, fieldDeadline, nsToMs(now) + 60_000}, "iother", recordSuperseded},
				{"just past MaxAge", []any{fieldID, "iother", fieldCreated, nsToMs(stale), fieldDeadline, nsToMs(now) + 60_000, "extra", "x"}, "iours", recordAbsent},
				{"time unparsed", []any{fieldID, "iother", fieldCreated, "yesterday", fieldDeadline, nsToMs(now) + 60_000}, "iours", recordAbsent},
				{"no time", []any{fieldID, "iother"}, "iours", recordAbsent},
			} {
				set := func() {
					require.NoError(t, rdb.Del(ctx, key).Err())
					if c.record != nil {
						require.NoError(t, rdb.HSet(ctx, key, c.record...).Err())
					}
				}
				set()
				got, err := m.store.touch(ctx, ours, ours.deadline.Load(), m.stale())
				require.NoError(t, err, c.name)
				assert.Equal(t, c.touch, got, c.name+": touch")
				set()
				id, err := m.adopt(ctx, ours, ours.deadline.Load())
				require.NoError(t, err, c.name)
				assert.Equal(t, c.want, id, c.name)
				rec, ok, err := m.store.get(ctx, k)
				require.NoError(t, err, c.name)
				require.True(t, ok, c.name)
				assert.Equal(t, c.want, rec.id, c.name)
				if c.want == "iours" {
					assert.Equal(t, record{id: "iours", template: ours.shape.template, created: now, deadline: ours.deadline.Load()}, rec, c.name)
					fields, err := rdb.HKeys(ctx, key).Result()
					require.NoError(t, err)
					assert.ElementsMatch(t, []string{fieldID, fieldTemplate, fieldCreated, fieldDeadline}, fields, c.name+": nothing left of the old record")
					exp, err := rdb.PExpireTime(ctx, key).Result()
					require.NoError(t, err)
					assert.Equal(t, nsToMs(ours.deadline.Load()), exp.Milliseconds(), c.name+": expires at its deadline")
				}
			}
		})
	}
}

// blockedCreate is a provider whose creates last until their ctx ends.
type blockedCreate struct {
	stubProvider
	started chan struct{} // closed by the first create
	once    sync.Once
}

func (p *blockedCreate) Create(ctx context.Context, _ CreateRequest) (Sandbox, error) {
	p.once.Do(func() { close(p.started) })
	<-ctx.Done()
	return Sandbox{}, ctx.Err()
}

// A Close cut short lets go of the create locks of the creates it cut
// (TestCloseCutShortReleasesTheCreateLock), but waits RedisTimeout at most
// for a Redis turn to do it, not LockTTL: a Redis whose connections are all
// busy cannot hold a shutdown that long past its deadline.
func TestCloseCutShortWaitsForATurnRedisTimeoutAtMost(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), PoolSize: 2})
	defer rdb.Close()
	p := &blockedCreate{started: make(chan struct{})}
	m, err := New(Config{Provider: p, Redis: rdb, LockTTL: time.Hour, RedisTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	go func() { _, _ = m.Acquire(context.Background(), "u", "p") }()
	<-p.started
	require.NoError(t, m.store.turns.Acquire(context.Background(), 2), "every turn, held elsewhere")
	defer m.store.turns.Release(2)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- m.Close(ctx) }()
	select {
	case err := <-closed:
		require.ErrorIs(t, err, context.DeadlineExceeded)
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for a Redis turn past RedisTimeout")
	}
	assert.True(t, mr.Exists(m.store.lockKey(pairKey{"u", "p"})), "no turn, no release: the lock expires at its TTL")
}

// A create that Close cuts short between its two quota reservations (the
// user's set, then the global one) gives back the place the first took.
// Before, the give-back ran on the ended context, and the place counted
// against MaxPerUser until CreateTimeout.
func TestCloseCutShortBetweenTheQuotaSetsGivesThePlaceBack(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), MaxRetries: -1})
	defer rdb.Close()
	entered := make(chan struct{})
	rdb.AddHook(gateHook{arg: "sandboxpool:live", entered: entered}) // no release: held until its ctx ends
	m, err := New(Config{Provider: stubProvider{}, Redis: rdb, MaxSandboxes: 10, MaxPerUser: 10, RedisTimeout: time.Minute})
	require.NoError(t, err)
	acquired := make(chan error, 1)
	go func() { _, err := m.Acquire(context.Background(), "u", "p"); acquired <- err }()
	<-entered
	require.True(t, mr.Exists(m.store.userLiveKey("u")), "the user's set took the place first")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, m.Close(ctx), context.DeadlineExceeded)
	require.ErrorIs(t, <-acquired, ErrClosed)
	assert.False(t, mr.Exists(m.store.userLiveKey("u")), "the user's place was left to expire")
}

// Records Redis returns but that do not parse, and keys of another type,
// are errors of those pairs, not of Redis: they never open the breaker, so a
// few bad keys cannot switch every pair to uncoordinated creates.
func TestBadRecordsDoNotOpenTheBreaker(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close()
	m, err := New(Config{Provider: stubProvider{}, Redis: rdb})
	require.NoError(t, err)
	defer m.Close(context.Background())
	ctx := context.Background()
	for i := range 2 * breakerTrips {
		k := pairKey{"u", fmt.Sprint("p", i)}
		if i%2 == 0 {
			mr.HSet(m.store.sbxKey(k), fieldID, "i1", fieldCreated, "yesterday", fieldDeadline, "1")
		} else {
			require.NoError(t, mr.Set(m.store.sbxKey(k), "a string"))
		}
		_, _, err := m.store.get(ctx, k)
		require.Error(t, err)
		assert.NotErrorIs(t, err, errRedisUnavailable, "pair %d", i)
		if i%2 == 0 {
			assert.ErrorIs(t, err, errCorruptRecord)
		}
	}
	assert.False(t, m.store.degraded(), "breaker still closed")
	assert.EqualValues(t, 2*breakerTrips, m.Stats().RedisErrors, "each is still counted")

	mr.Close() // Redis itself failing still opens it
	for range breakerTrips {
		_, _, err := m.store.get(ctx, pairKey{"u", "p0"})
		require.ErrorIs(t, err, errRedisUnavailable)
	}
	assert.True(t, m.store.degraded())
}

// The Manager's Redis turns match the client's pooled connections (one
// node's, for a Cluster or a Ring); a size left to go-redis's default (a
// Ring's options keep 0) is the default, never zero turns, which would
// block every call.
func TestRedisTurnsMatchThePool(t *testing.T) {
	def := 10 * runtime.GOMAXPROCS(0)
	for name, c := range map[string]struct {
		rdb  redis.UniversalClient
		want int
	}{
		"client default": {redis.NewClient(&redis.Options{}), def},
		"client sized":   {redis.NewClient(&redis.Options{PoolSize: 7}), 7},
		"client capped":  {redis.NewClient(&redis.Options{PoolSize: 7, MaxActiveConns: 3}), 3},
		"cluster":        {redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"a:1", "b:1", "c:1"}, PoolSize: 4}), 4},
		"ring default":   {redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "a:1", "b": "b:1"}}), def},
		"wrapper":        {struct{ redis.UniversalClient }{redis.NewClient(&redis.Options{PoolSize: 3})}, def},
	} {
		assert.Equal(t, c.want, poolSize(c.rdb), name)
		_ = c.rdb.Close()
	}
}

// A call that waits for a turn and gives up is errNoTurn, and neither the
// breaker nor Stats counts it as a Redis failure.
func TestWaitingForARedisTurnIsNoRedisFailure(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), PoolSize: 1})
	defer rdb.Close()
	st, errs := testStore(rdb, time.Second)
	require.True(t, st.turns.TryAcquire(1), "the only turn, held by another call")
	for range 2 * breakerTrips {
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		err := st.do(ctx, func(ctx context.Context) error { return rdb.Ping(ctx).Err() })
		cancel()
		require.ErrorIs(t, err, errNoTurn)
		assert.NotErrorIs(t, err, errRedisUnavailable)
	}
	assert.False(t, st.degraded())
	assert.Zero(t, errs.Load())
	st.turns.Release(1)
	require.NoError(t, st.ping(context.Background()))
}

// A call its caller's context ends before RedisTimeout does (a Remove under
// a handler's short deadline) is no Redis failure either: three in a row
// used to open the breaker, and every create then ran without the lock.
func TestCallsTheirCallerEndsAreNoRedisFailure(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close()
	st, errs := testStore(rdb, time.Minute)
	slow := func(call context.Context) error { <-call.Done(); return call.Err() } // a Redis slower than the caller
	for range 2 * breakerTrips {
		// The caller's deadline passes once the call has started (a timer
		// could pass it before the call had its turn: errNoTurn).
		ctx := &lateDeadline{Context: context.Background(), done: make(chan struct{})}
		err := st.do(ctx, func(call context.Context) error { close(ctx.done); return slow(call) })
		require.ErrorIs(t, err, errEndedByCaller)
		require.ErrorIs(t, err, context.DeadlineExceeded, "still the caller's deadline to errors.Is")
		assert.NotErrorIs(t, err, errRedisUnavailable)
	}
	assert.False(t, st.degraded())
	assert.Zero(t, errs.Load())

	// RedisTimeout ending a call is a failure, as before.
	st.timeout = time.Millisecond
	for range breakerTrips {
		require.ErrorIs(t, st.do(context.Background(), slow), errRedisUnavailable)
	}
	assert.True(t, st.degraded())
	assert.EqualValues(t, breakerTrips, errs.Load())
}

// lateDeadline is a context whose deadline passes when done is closed.
type lateDeadline struct {
	context.Context
	done chan struct{}
}

func (c *lateDeadline) Done() <-chan struct{} { return c.done }

func (c *lateDeadline) Err() error {
	select {
	case <-c.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

// Failures among Redis's answers do not open the breaker: Redis answered a
// call within RedisTimeout, so calls that failed meanwhile were cut short
// on this side (a burst on a busy host). Failures after RedisTimeout of
// silence open it, as three failures alone did before.
func TestBreakerOpensOnlyOnASilentRedis(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close()
	st, errs := testStore(rdb, time.Minute)
	ctx := context.Background()
	cut := func(context.Context) error { return errors.New("i/o timeout") }
	require.NoError(t, st.ping(ctx))
	for range 2 * breakerTrips {
		require.ErrorIs(t, st.do(ctx, cut), errRedisUnavailable)
	}
	assert.False(t, st.degraded(), "Redis answered within RedisTimeout")

	require.NoError(t, st.ping(ctx)) // and again: the failures start anew
	st.timeout = time.Millisecond
	time.Sleep(2 * st.timeout)
	for range breakerTrips - 1 {
		require.ErrorIs(t, st.do(ctx, cut), errRedisUnavailable)
	}
	assert.False(t, st.degraded(), "fewer than breakerTrips failures")
	require.ErrorIs(t, st.do(ctx, cut), errRedisUnavailable)
	assert.True(t, st.degraded(), "silent for RedisTimeout")
	assert.EqualValues(t, 3*breakerTrips, errs.Load(), "every failure is counted")
}

// A Cluster client is told to read the cluster's map again after a call
// Redis did not answer (see nodeLost), and only then: not after a reply,
// an error reply included, nor after a call its caller ended or the open
// breaker refused, none of which says a node is gone. A client that keeps
// no map is left alone.
func TestClusterMapIsReadAgainOnlyAfterAnUnansweredCall(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close()
	cluster := &mapReloads{UniversalClient: rdb}
	st, _ := testStore(cluster, time.Minute)
	ctx := context.Background()
	reply := func(msg string) func(context.Context) error {
		return func(context.Context) error { return replyError(msg) }
	}
	for _, call := range []func(context.Context) error{
		func(ctx context.Context) error { return rdb.Ping(ctx).Err() },
		reply("WRONGTYPE Operation against a key holding the wrong kind of value"),
		reply("OOM command not allowed when used memory > 'maxmemory'"),
		reply("CLUSTERDOWN The cluster is down"),
	} {
		_ = st.do(ctx, call)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	_ = st.do(cancelled, func(ctx context.Context) error { return ctx.Err() })
	assert.Zero(t, cluster.n.Load(), "Redis answered, or the caller ended the call")

	refused := func(context.Context) error { return &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED} }
	require.ErrorIs(t, st.do(ctx, refused), errRedisUnavailable)
	assert.EqualValues(t, 1, cluster.n.Load(), "a node refused the connection")
	st.timeout = time.Millisecond
	silent := func(call context.Context) error { <-call.Done(); return call.Err() }
	require.ErrorIs(t, st.do(ctx, silent), errRedisUnavailable)
	assert.EqualValues(t, 2, cluster.n.Load(), "a node did not answer within RedisTimeout")

	time.Sleep(2 * st.timeout)
	for !st.degraded() {
		_ = st.do(ctx, silent)
	}
	n := cluster.n.Load()
	require.ErrorIs(t, st.do(ctx, silent), errRedisUnavailable)
	assert.Equal(t, n, cluster.n.Load(), "the open breaker refused the call: it reached no node")

	plain, _ := testStore(rdb, time.Minute)
	assert.Nil(t, plain.nodes)
	require.ErrorIs(t, plain.do(ctx, refused), errRedisUnavailable)
}

// mapReloads is a client that keeps a cluster's map (as a Cluster client
// does) and counts how often it is told to read it again.
type mapReloads struct {
	redis.UniversalClient
	n atomic.Int64
}

func (c *mapReloads) ReloadState(context.Context) { c.n.Add(1) }

// replyError is an error reply from Redis.
type replyError string

func (e replyError) Error() string { return string(e) }
func (replyError) RedisError()     {}

// testStore is a Manager's store on rdb with the given RedisTimeout, and
// the count of Redis errors it keeps.
func testStore(rdb redis.UniversalClient, timeout time.Duration) (*store, *atomic.Int64) {
	errs := new(atomic.Int64)
	cfg := Config{Redis: rdb, RedisTimeout: timeout, breakerCooldown: time.Minute}.withDefaults()
	return newStore(cfg, slog.New(slog.DiscardHandler), errs), errs
}

// A quota counts pairs: a pair's slots share one place (a sandbox past
// MaxAge and its replacement), freed by the last of them; and the maps
// that hold the places give their memory back after churn, and hold
// nothing without a quota.
func TestAdmissionPlacesArePairs(t *testing.T) {
	a := newAdmission(Config{MaxSandboxes: 2, MaxPerUser: 2})
	up, uq, vq := pairKey{"u", "p"}, pairKey{"u", "q"}, pairKey{"v", "q"}
	require.NoError(t, a.reserve(up, 0, false))
	require.NoError(t, a.reserve(up, 0, false), "a replacement shares its pair's place")
	require.NoError(t, a.reserve(uq, 0, false))
	require.ErrorIs(t, a.reserve(vq, 0, false), ErrQuotaExceeded)
	a.release(up)
	require.ErrorIs(t, a.reserve(vq, 0, false), ErrQuotaExceeded, "the pair still holds its place")
	a.release(up)
	require.NoError(t, a.reserve(vq, 0, false), "its last slot freed it")

	churned := newAdmission(Config{MaxPerUser: 1})
	const n = 100_000
	for i := range n {
		require.NoError(t, churned.reserve(pairKey{fmt.Sprint("u", i), "p"}, 0, false))
	}
	assert.Equal(t, n, churned.total)
	for i := range n {
		churned.release(pairKey{fmt.Sprint("u", i), "p"})
	}
	assert.Zero(t, churned.total)
	assert.Empty(t, churned.places)
	assert.Empty(t, churned.perUser)
	assert.Less(t, churned.peakPlaces, minShrink, "rebuilt as it emptied")
	assert.Less(t, churned.peakUsers, minShrink)

	none := newAdmission(Config{})
	for i := range 1000 {
		require.NoError(t, none.reserve(pairKey{fmt.Sprint("u", i), "p"}, 0, false))
	}
	assert.Empty(t, none.places, "no quota, no map")
}

// The in-process create limiter (memory-only, or Redis down) keeps a
// user's entry only while it restricts that user: a stream of distinct
// users does not grow it for ever (the audit's "dictionary that grows
// forever", for rate limits), and the sweep never frees a user it still
// restricts.
func TestCreateLimiterForgetsUsersItNoLongerRestricts(t *testing.T) {
	a := newAdmission(Config{CreateLimit: RateLimit{Rate: 1, Burst: 1, Per: time.Second}})
	const users, step = 100_000, int64(10 * time.Millisecond) // about 100 users restricted at any time
	now, peak := int64(0), 0
	for i := range users {
		if err := a.reserve(pairKey{fmt.Sprint("u", i), "p"}, now, true); err != nil {
			t.Fatalf("user %d, never seen before, refused: %v", i, err)
		}
		peak = max(peak, len(a.tat))
		// The user before last second's, whatever sweep ran since, is
		// still restricted (a refusal changes nothing).
		if i >= 99 && !errors.Is(a.reserve(pairKey{fmt.Sprint("u", i-99), "q"}, now, true), ErrRateLimited) {
			t.Fatalf("user %d, still restricted, was swept", i-99)
		}
		now += step
	}
	assert.LessOrEqual(t, peak, minSweep, "entries outlived the limits they kept")
	require.NoError(t, a.reserve(pairKey{fmt.Sprint("u", users-101), "q"}, now, true), "a user no longer restricted")
}

// Removals kept while Redis does not answer are bounded: past
// maxUnannounced the oldest go (the audit's "dictionary that grows
// forever"), and a flush that fails part-way keeps the rest, in order,
// for the next try, ahead of what arrived meanwhile.
func TestUnannouncedRemovalsAreBoundedAndKeptInOrder(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	m, err := New(Config{Provider: stubProvider{}, Redis: rdb, probeInterval: time.Hour}) // no flush but the test's
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	kept := func() (ids []string) {
		m.unannounced.mu.Lock()
		defer m.unannounced.mu.Unlock()
		for _, r := range m.unannounced.q {
			ids = append(ids, r.ids[0])
		}
		return ids
	}
	for i := range 2 * maxUnannounced {
		m.keepRemoval(removal{pairKey{"u", "p"}, []string{fmt.Sprint(i)}})
	}
	ids := kept()
	require.Len(t, ids, maxUnannounced)
	assert.Equal(t, fmt.Sprint(maxUnannounced), ids[0], "the oldest are dropped")
	assert.Equal(t, fmt.Sprint(2*maxUnannounced-1), ids[len(ids)-1])

	// Redis fails the flush at once: everything is kept, in order.
	mr.SetError("LOADING")
	assert.False(t, m.flushRemovals(context.Background()))
	mr.SetError("")
	assert.Equal(t, ids, kept())

	// A flush that succeeds announces every removal, and keeps nothing.
	sub := rdb.Subscribe(context.Background(), "sandboxpool:removed")
	t.Cleanup(func() { _ = sub.Close() })
	_, err = sub.Receive(context.Background())
	require.NoError(t, err)
	assert.True(t, m.flushRemovals(context.Background()))
	assert.Empty(t, kept())
	msg, err := sub.ReceiveMessage(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "u:p "+ids[0], msg.Payload)

	// Redis refuses the removals (an ACL without PUBLISH, say): trying
	// them again would not help, and they would hold back the publication
	// of the outage's sandboxes (see catchUp) for good. They are dropped.
	m.keepRemoval(removal{pairKey{"u", "p"}, []string{"x"}})
	m.keepRemoval(removal{pairKey{"u", "q"}, []string{"y"}})
	mr.SetError("NOPERM User has no permissions to run the 'evalsha' command")
	assert.True(t, m.flushRemovals(context.Background()))
	mr.SetError("")
	assert.Empty(t, kept())
}

// Removals being made still count as waiting until each is made: a flush
// takes them from the queue first, and Stats().UnannouncedRemovals read 0
// for as long as it ran (up to a Redis timeout per step) while nothing had
// been made yet.
func TestUnannouncedRemovalsCountWhileTheyAreMade(t *testing.T) {
	m, entered, release := gatedManager(t, "x")
	m.keepRemoval(removal{pairKey{"u", "p"}, []string{"x"}})
	m.keepRemoval(removal{pairKey{"u", "q"}, []string{"y"}})

	done := make(chan bool)
	go func() { done <- m.flushRemovals(context.Background()) }()
	<-entered // the first removal is being made
	assert.EqualValues(t, 2, m.Stats().UnannouncedRemovals)
	m.keepRemoval(removal{pairKey{"u", "r"}, []string{"z"}})
	assert.EqualValues(t, 3, m.Stats().UnannouncedRemovals)
	close(release)
	require.True(t, <-done)
	assert.EqualValues(t, 1, m.Stats().UnannouncedRemovals, "the one kept during the flush waits for the next")
}

// Two catch-ups at once (two Close calls, each making its last try) run
// one after the other: the second's publication must not overtake the
// first's removals (see catchUp), and its flush must not hide the
// removals the first is making from Stats.UnannouncedRemovals. One whose
// ctx ends while it waits returns.
func TestCatchUpsRunOneAtATime(t *testing.T) {
	m, entered, release := gatedManager(t, "x")
	m.keepRemoval(removal{pairKey{"u", "p"}, []string{"x"}})

	first, second := make(chan struct{}), make(chan struct{})
	go func() { m.catchUp(context.Background()); close(first) }()
	<-entered // the first is making the removal
	go func() { m.catchUp(context.Background()); close(second) }()
	assert.Never(t, func() bool {
		select {
		case <-second:
			return true
		default:
			return m.Stats().UnannouncedRemovals != 1
		}
	}, 100*time.Millisecond, time.Millisecond, "the second catch-up ran beside the first")
	// A Close whose ctx ends while it waits for its turn gives up.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	m.catchUp(ctx)
	assert.EqualValues(t, 1, m.Stats().UnannouncedRemovals)
	close(release)
	<-first
	<-second
	assert.Zero(t, m.Stats().UnannouncedRemovals)
}

// gatedManager is a Manager on miniredis whose first Redis command that
// carries arg is held until release is closed (entered is closed when it
// arrives), and whose probe never runs: removals are made when the test
// says.
func gatedManager(t *testing.T, arg string) (m *Manager, entered, release chan struct{}) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	entered, release = make(chan struct{}), make(chan struct{})
	rdb.AddHook(gateHook{arg: arg, entered: entered, release: release})
	m, err := New(Config{Provider: stubProvider{}, Redis: rdb, probeInterval: time.Hour})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m, entered, release
}

// gateHook holds the first Redis command that carries arg until release
// is closed, and closes entered when it arrives. With no release, the
// command is held until its context ends, and fails with the context's
// error.
type gateHook struct {
	arg              string
	entered, release chan struct{}
}

func (gateHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (gateHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h gateHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	var once sync.Once
	return func(ctx context.Context, cmd redis.Cmder) error {
		ended := false
		if slices.Contains(cmd.Args(), any(h.arg)) {
			once.Do(func() {
				close(h.entered)
				if h.release == nil {
					<-ctx.Done()
					ended = true
					return
				}
				<-h.release
			})
		}
		if ended {
			cmd.SetErr(ctx.Err())
			return ctx.Err()
		}
		return next(ctx, cmd)
	}
}

// The Redis error replies that refuse writes (see refusesWrites), as
// go-redis returns them and the store wraps them.
func TestRefusesWrites(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), MaxRetries: -1})
	defer rdb.Close()
	for reply, refuses := range map[string]bool{
		"OOM command not allowed when used memory > 'maxmemory'.":                                          true,
		"MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.": true,
		"READONLY You can't write against a read only replica.":                                            true,
		"NOREPLICAS Not enough good replicas to write.":                                                    true,
		"LOADING Redis is loading the dataset in memory":                                                   false,
		"BUSY Redis is busy running a script.":                                                             false,
		"WRONGTYPE Operation against a key holding the wrong kind of value":                                false,
		"ERR OOM-like text later in a message":                                                             false,
	} {
		mr.SetError(reply)
		err := rdb.Get(context.Background(), "k").Err()
		require.Error(t, err)
		assert.Equal(t, refuses, refusesWrites(fmt.Errorf("%w: %w", errRedisUnavailable, err)), reply)
	}
	assert.False(t, refusesWrites(context.DeadlineExceeded))
	assert.False(t, refusesWrites(nil))
}

// An episode of refused writes: a create waits the first RedisTimeout out,
// then goes without the lock, as do the creates after it (one of them
// logs), until a write is taken; the next refusal is waited out again.
func TestWritesRefusedEpisode(t *testing.T) {
	st := &store{born: time.Now(), timeout: 20 * time.Millisecond}
	long, first := st.writesRefused()
	assert.False(t, long, "the episode's first refusal is waited out")
	assert.False(t, first)
	time.Sleep(st.timeout)
	long, first = st.writesRefused()
	assert.True(t, long, "refused for RedisTimeout")
	assert.True(t, first, "the first create past it logs")
	long, first = st.writesRefused()
	assert.True(t, long)
	assert.False(t, first, "one warning per episode")

	st.writesAccepted()
	long, _ = st.writesRefused()
	assert.False(t, long, "a write taken ends the episode")
}

// A master that does not answer a recheck keeps what it said last, so a
// Redis Cluster one of whose masters evicts is not reported mended while
// that master is down; once every master answered, those that left the
// cluster are forgotten, so one that evicted does not hold RedisEvicts
// set for ever.
func TestEvictionStateOfMastersThatDidNotAnswer(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	var logs bytes.Buffer
	m, err := New(Config{Provider: stubProvider{}, Redis: rdb, probeInterval: time.Hour, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, err)
	require.NoError(t, m.Close(context.Background())) // its own check, refused by miniredis, is over
	evicting := evictionPolicy{policy: "allkeys-lru", maxmemory: "1000"}
	mended := evictionPolicy{policy: "noeviction", maxmemory: "1000"}

	known := map[string]evictionPolicy{}
	m.evictionChanged(known, map[string]evictionPolicy{"a": evicting, "b": evicting}, true)
	assert.True(t, m.store.evicts.Load())
	assert.Equal(t, 2, strings.Count(logs.String(), "Redis evicts keys when full"), "one per master")

	m.evictionChanged(known, map[string]evictionPolicy{"a": mended}, false) // b did not answer
	assert.True(t, m.store.evicts.Load(), "b, unanswered, still evicts as far as is known")
	assert.Equal(t, 1, strings.Count(logs.String(), `level=INFO msg="sandboxpool: Redis no longer evicts keys" maxmemory_policy=noeviction maxmemory=1000 node=a`))

	m.evictionChanged(known, map[string]evictionPolicy{"a": mended}, true) // b left the cluster
	assert.False(t, m.store.evicts.Load())
	assert.Equal(t, map[string]evictionPolicy{"a": mended}, known)
	assert.Equal(t, 2, strings.Count(logs.String(), "Redis evicts keys when full"))
	assert.Equal(t, 1, strings.Count(logs.String(), "Redis no longer evicts keys"), "a master gone is no mend")
}

// A detached context carries its caller's values, not its cancellation;
// Close cancels it, with the cause readable from what derives from it; and
// the contexts derived from it (one per Redis call of a fill) join its
// cancellation without a goroutine each, as they would if Value asked the
// caller's context first.
func TestDetachedContext(t *testing.T) {
	type key struct{}
	m, err := New(Config{Provider: stubProvider{}, manualReap: true})
	require.NoError(t, err)
	caller, leave := context.WithCancel(context.WithValue(context.Background(), key{}, "request"))
	ctx, cancel := m.detached(caller, time.Hour)
	defer cancel()
	leave()
	require.NoError(t, ctx.Err(), "the caller leaving cut the work")
	assert.Equal(t, "request", ctx.Value(key{}))
	deadline, ok := ctx.Deadline()
	assert.True(t, ok)
	assert.WithinDuration(t, time.Now().Add(time.Hour), deadline, time.Minute)

	before := runtime.NumGoroutine()
	var children []context.Context
	for range 100 {
		child, cancel := context.WithTimeout(ctx, time.Hour)
		defer cancel()
		children = append(children, child)
	}
	assert.Less(t, runtime.NumGoroutine()-before, 10, "a goroutine per derived context")

	require.NoError(t, m.Close(context.Background()))
	m.cancel() // as Close does when its ctx runs out
	for _, child := range children {
		<-child.Done()
		assert.ErrorIs(t, context.Cause(child), context.Canceled)
		assert.Equal(t, "request", child.Value(key{}))
	}
	closed, cancel2 := m.detached(caller, time.Hour)
	defer cancel2()
	assert.Error(t, closed.Err(), "work detached after Close cut the rest is cut at once")
}
