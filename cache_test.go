package sandboxpool_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/alicebob/miniredis/v2/server"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/sandboxpool/sandboxpool"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
	"github.com/sandboxpool/sandboxpool/internal/redistest"
)

// cluster is several Managers (instances) sharing one Redis and provider.
type cluster struct {
	mr    *miniredis.Miniredis // nil on a real redis-server
	addr  string
	rdb   *redis.Client // for the test's own reads and writes
	p     *fp.Provider
	clock *fakeClock
	base  sandboxpool.Config
}

func newMiniCluster(t *testing.T, mutate ...func(*sandboxpool.Config)) *cluster {
	t.Helper()
	mr := miniredis.RunT(t)
	mr.SetTime(newFakeClock().Now())
	return newCluster(t, mr, mr.Addr(), mutate...)
}

// newRealCluster is newMiniCluster on a real redis-server (internal/redistest).
// Redis expires keys on its own clock there, so tests that advance time
// stay on miniredis.
func newRealCluster(t *testing.T, mutate ...func(*sandboxpool.Config)) *cluster {
	t.Helper()
	return newCluster(t, nil, redistest.Start(t).Addr, mutate...)
}

func newCluster(t *testing.T, mr *miniredis.Miniredis, addr string, mutate ...func(*sandboxpool.Config)) *cluster {
	clk := newFakeClock()
	p := fp.New()
	p.Now = clk.Now
	cfg := sandboxpool.Config{Provider: p, IdleTimeout: 5 * time.Minute, MaxAge: 15 * time.Minute}
	sandboxpool.SetClock(&cfg, clk.Now)
	sandboxpool.ManualReaper(&cfg)
	sandboxpool.FastRedisRecovery(&cfg, 20*time.Millisecond)
	for _, f := range mutate {
		f(&cfg)
	}
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr})
	t.Cleanup(func() { _ = rdb.Close() })
	return &cluster{mr: mr, addr: addr, rdb: rdb, p: p, clock: clk, base: cfg}
}

// onBoth runs a test on miniredis and on a real redis-server.
func onBoth(t *testing.T, test func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster)) {
	t.Run("miniredis", func(t *testing.T) { test(t, newMiniCluster) })
	t.Run("redis-server", func(t *testing.T) { test(t, newRealCluster) })
}

// keys lists the Redis keys, sorted.
func (c *cluster) keys(t *testing.T) []string {
	t.Helper()
	keys, err := c.rdb.Keys(context.Background(), "*").Result()
	require.NoError(t, err)
	slices.Sort(keys)
	return keys
}

func (c *cluster) hget(t *testing.T, key, field string) string {
	t.Helper()
	v, err := c.rdb.HGet(context.Background(), key, field).Result()
	if errors.Is(err, redis.Nil) {
		return ""
	}
	require.NoError(t, err)
	return v
}

// instance builds a Manager with its own Redis client, as another process would.
func (c *cluster) instance(t *testing.T, mutate ...func(*sandboxpool.Config)) *sandboxpool.Manager {
	t.Helper()
	cfg := c.base
	if cfg.Redis == nil {
		cfg.Redis = c.client(t)
	}
	for _, f := range mutate {
		f(&cfg)
	}
	m, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

// client is a Redis client of the cluster's own, as an instance's, with
// hooks added (see faultHook).
func (c *cluster) client(t *testing.T, hooks ...redis.Hook) *redis.Client {
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: c.addr, MaxRetries: -1})
	for _, h := range hooks {
		rdb.AddHook(h)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// sharing builds two instances that both hold the pair ("u", "p")'s one
// sandbox, id.
func (c *cluster) sharing(t *testing.T) (a, b *sandboxpool.Manager, id string) {
	t.Helper()
	a, b = c.instance(t), c.instance(t)
	id = acquireID(t, a, "u", "p")
	require.Equal(t, id, acquireID(t, b, "u", "p"))
	return a, b, id
}

func (c *cluster) advance(d time.Duration) {
	c.clock.Advance(d)
	if c.mr != nil {
		c.mr.FastForward(d)
		c.mr.SetTime(c.clock.Now())
	}
}

// A Redis that will not say its eviction policy (miniredis has no INFO
// memory; an ACL or a proxy may refuse INFO) is not a failing Redis: the
// check says so at Debug, and neither warns nor counts a Redis error.
func TestEvictionPolicyUnreadIsOnlyDebug(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	var logs syncBuffer
	m, err := sandboxpool.New(sandboxpool.Config{Provider: fp.New(), Redis: rdb,
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	require.NoError(t, err)
	require.NoError(t, m.Close(context.Background())) // waits for the check
	assert.Contains(t, logs.String(), `level=DEBUG msg="sandboxpool: cannot read Redis's eviction policy" error="section (memory) is not supported"`)
	assert.NotContains(t, logs.String(), "level=WARN")
	assert.Zero(t, m.Stats().RedisErrors)
	assert.False(t, m.Stats().RedisEvicts, "not known to evict")
}

func TestRedisKeyLayoutAndAlignedTTL(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	id := acquireID(t, m, "alice", "p1")
	key := "sandboxpool:{alice:p1}:sbx"
	assert.Equal(t, []string{key}, c.mr.Keys())
	assert.Equal(t, id, c.mr.HGet(key, "id"))
	assert.Equal(t, "base", c.mr.HGet(key, "tpl"))
	assert.Equal(t, 5*time.Minute, c.mr.TTL(key), "the key expires with the sandbox")
	dl, _ := c.p.Deadline(id)
	assert.Equal(t, strconv.FormatInt(dl.UnixMilli(), 10), c.mr.HGet(key, "deadline"), "Redis and provider deadlines agree")

	c.advance(5 * time.Minute)
	assert.Empty(t, c.mr.Keys(), "no key outlives its sandbox")
	_, alive := c.p.Deadline(id)
	assert.False(t, alive)
}

// A new process on the same Redis reconnects to the pair's sandbox (via
// Redis, not by listing) and creates nothing.
func TestRedisRestartReconnects(t *testing.T) {
	c := newMiniCluster(t)
	m1 := c.instance(t)
	id := acquireID(t, m1, "u", "p")
	require.NoError(t, m1.Close(context.Background()))
	m2 := c.instance(t)
	assert.Equal(t, id, acquireID(t, m2, "u", "p"))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpList), "the cache hit needs no listing")
	st := m2.Stats()
	assert.EqualValues(t, 1, st.CacheHits)
	assert.EqualValues(t, 1, st.Reconnects)
	assert.EqualValues(t, 0, st.Creates)
}

func TestRedisNamespacesIsolate(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t)
		a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Namespace = "team-a" })
		b := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Namespace = "team-b" })
		ida, idb := acquireID(t, a, "u", "p"), acquireID(t, b, "u", "p")
		assert.NotEqual(t, ida, idb)
		assert.Equal(t, []string{"team-a:{u:p}:sbx", "team-b:{u:p}:sbx"}, c.keys(t))
		require.NoError(t, a.Remove(context.Background(), "u", "p"))
		assert.Equal(t, []string{"team-b:{u:p}:sbx"}, c.keys(t))
		assert.Equal(t, idb, acquireID(t, b, "u", "p"))
	})
}

// stealLock makes the pair's create lock "expire" under its holder and
// another instance take it, as a holder stalled past LockTTL would see.
func (c *cluster) stealLock(t *testing.T, user, project string) {
	t.Helper()
	ctx, lockKey := context.Background(), "sandboxpool:{"+user+":"+project+"}:lock"
	n, err := c.rdb.Exists(ctx, lockKey).Result()
	require.NoError(t, err)
	require.EqualValues(t, 1, n, "the creator holds the lock")
	require.NoError(t, c.rdb.Set(ctx, lockKey, "someone-else", time.Minute).Err())
}

// publish writes the pair's record as another instance would.
func (c *cluster) publish(t *testing.T, user, project, id string) {
	t.Helper()
	ctx, key, now := context.Background(), "sandboxpool:{"+user+":"+project+"}:sbx", c.clock.Now()
	require.NoError(t, c.rdb.HSet(ctx, key, "id", id, "tpl", "base", "created", now.UnixMilli(), "deadline", now.Add(5*time.Minute).UnixMilli()).Err())
	require.NoError(t, c.rdb.PExpireAt(ctx, key, now.Add(5*time.Minute)).Err())
}

// acquireAsync runs one Acquire in the background; the lease is released
// before the result is sent.
func acquireAsync(m *sandboxpool.Manager, user, project string) <-chan acquireResult {
	done := make(chan acquireResult, 1)
	go func() {
		l, err := m.Acquire(context.Background(), user, project)
		if err != nil {
			done <- acquireResult{err: err}
			return
		}
		defer l.Release()
		done <- acquireResult{id: l.Sandbox().ID}
	}()
	return done
}

type acquireResult struct {
	id  string
	err error
}

// A create that outlasts LockTTL keeps the pair's lock, which it refreshes
// every LockTTL/3: another instance asking for the pair meanwhile waits for
// it and reuses its sandbox, instead of taking the lock once LockTTL has
// passed and creating a second. Real Redis expires the lock on its own
// clock. Before this test, no create outlasted its lock's first refresh.
func TestRealRedisCreateOutlastingLockTTLKeepsItsLock(t *testing.T) {
	const ttl = 450 * time.Millisecond // refreshed every 150 ms
	c := newRealCluster(t, func(cfg *sandboxpool.Config) { cfg.LockTTL = ttl })
	a, b := c.instance(t), c.instance(t)
	c.p.SetLatency(fp.OpCreate, 5*ttl)
	first := acquireAsync(a, "u", "p")
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)
	time.Sleep(2 * ttl) // the lock would have expired twice over unrefreshed
	left, err := c.rdb.PTTL(context.Background(), "sandboxpool:{u:p}:lock").Result()
	require.NoError(t, err)
	assert.Positive(t, left, "the create's lock expired while it ran")
	second := acquireAsync(b, "u", "p")

	ra, rb := result(t, first), result(t, second)
	require.NoError(t, ra.err)
	require.NoError(t, rb.err)
	assert.Equal(t, ra.id, rb.id, "the other instance made its own sandbox")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	assert.Zero(t, a.Stats().LockLost)
}

// A create's lock outlives a refresh that Redis failed (a blip: a stall,
// a dropped connection): the next refresh renews it. Before, the first
// failed refresh stopped the refreshing for good, so the lock expired under
// a create that outlasted it, and the instance waiting for the pair made a
// second sandbox.
func TestRealRedisCreateLockOutlivesAFailedRefresh(t *testing.T) {
	const ttl = 450 * time.Millisecond // refreshed every 150 ms
	c := newRealCluster(t, func(cfg *sandboxpool.Config) { cfg.LockTTL = ttl })
	hook := &faultHook{key: "sandboxpool:{u:p}:lock", fate: func(n int, _ redis.Cmder) fate {
		if n == 2 { // the first refresh, after the lock's grant
			return fail
		}
		return pass
	}}
	a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Redis = c.client(t, hook) })
	b := c.instance(t)
	c.p.SetLatency(fp.OpCreate, 5*ttl)
	first := acquireAsync(a, "u", "p")
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)
	second := acquireAsync(b, "u", "p") // waits for the lock

	ra, rb := result(t, first), result(t, second)
	require.NoError(t, ra.err)
	require.NoError(t, rb.err)
	hook.mu.Lock()
	refreshes := hook.seen - 3 // the grant, the publish and the release
	hook.mu.Unlock()
	require.GreaterOrEqual(t, refreshes, 3, "the create outlasted several refreshes, one of them failed")
	assert.Equal(t, ra.id, rb.id, "the other instance made its own sandbox")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	assert.Zero(t, a.Stats().LockLost)
}

// A Close whose ctx ends while a create is in flight cancels the create and
// still lets go of the pair's create lock and quota place. Before, both ran
// on the cancelled context and never reached Redis: the other instances
// waiting for the pair waited out LockTTL for a create that had ended, and
// the place counted against MaxSandboxes until CreateTimeout.
func TestCloseCutShortReleasesTheCreateLock(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 1 })
	a := c.instance(t)
	c.p.SetLatency(fp.OpCreate, time.Hour)
	cut := acquireAsync(a, "u", "p")
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)
	require.True(t, c.mr.Exists("sandboxpool:{u:p}:lock"), "the create holds the lock")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, a.Close(ctx), context.DeadlineExceeded)
	require.ErrorIs(t, result(t, cut).err, sandboxpool.ErrClosed)
	assert.False(t, c.mr.Exists("sandboxpool:{u:p}:lock"), "the lock was left to expire")
	places, _ := c.mr.ZMembers("sandboxpool:live")
	assert.Empty(t, places, "the create's quota place was left to expire")
}

// FuzzRecord: whatever another program (or a hand edit) leaves in a
// pair's record, parsing it never panics, and the times of a record it
// accepts are the unix ms written, as nanoseconds that did not overflow;
// any time the Manager writes parses back to itself, to the millisecond.
func FuzzRecord(f *testing.F) {
	f.Add("1764000000000", "1764000300000", int64(1764000000123456789), int64(0))
	f.Add("9223372036854", "9223372036855", int64(math.MaxInt64), int64(-1))
	f.Add("-1", "", int64(1), int64(999999))
	f.Add("1e3", " 5", int64(0), int64(math.MaxInt64))
	f.Fuzz(func(t *testing.T, created, deadline string, ns1, ns2 int64) {
		_, c, d, ok, err := sandboxpool.ParseRecord(map[string]string{"id": "i1", "created": created, "deadline": deadline})
		if err == nil {
			require.True(t, ok)
			for raw, ns := range map[string]int64{created: c, deadline: d} {
				ms, perr := strconv.ParseInt(raw, 10, 64)
				require.NoError(t, perr, "accepted %q", raw)
				require.GreaterOrEqual(t, ns, int64(0), "accepted %q", raw)
				require.Equal(t, ms, ns/int64(time.Millisecond), "%q overflowed", raw)
			}
		}
		if ns1 < 0 || ns2 < 0 {
			return // no time the Manager keeps
		}
		written := map[string]string{"id": "i1",
			"created": strconv.FormatInt(ns1/int64(time.Millisecond), 10), "deadline": strconv.FormatInt(ns2/int64(time.Millisecond), 10)}
		_, c, d, ok, err = sandboxpool.ParseRecord(written)
		require.NoError(t, err, "%v", written)
		require.True(t, ok)
		assert.Equal(t, ns1/int64(time.Millisecond), c/int64(time.Millisecond))
		assert.Equal(t, ns2/int64(time.Millisecond), d/int64(time.Millisecond))
	})
}

// A record whose creation time is in this instance's future (another
// instance's clock far ahead, or a hand edit) is timed from now: the
// sandbox is not handed out past now+MaxAge. Before, a record created a
// year ahead kept its sandbox in service for a year and MaxAge.
func TestRedisRecordFromTheFutureKeepsMaxAge(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	sb, err := c.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: time.Hour})
	require.NoError(t, err)
	now := c.clock.Now()
	key := "sandboxpool:{u:p}:sbx"
	require.NoError(t, c.rdb.HSet(context.Background(), key, "id", sb.ID, "tpl", "base",
		"created", now.AddDate(1, 0, 0).UnixMilli(), "deadline", now.Add(5*time.Minute).UnixMilli()).Err())
	require.Equal(t, sb.ID, acquireID(t, m, "u", "p"), "reconnected")

	for range 31 { // 15 min 30 s of use every 30 s: past MaxAge
		c.advance(30 * time.Second)
		m.ReapNow()
		acquireID(t, m, "u", "p")
	}
	assert.NotEqual(t, sb.ID, acquireID(t, m, "u", "p"), "handed out past MaxAge")
}

// A creator whose lock expired (stalled past LockTTL) cannot publish: it
// kills its own sandbox and adopts the winner's.
func TestRedisStalledLockHolderCannotPublish(t *testing.T) {
	onBoth(t, testStalledLockHolder)
}

func testStalledLockHolder(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
	c := newCluster(t, func(cfg *sandboxpool.Config) { cfg.LockTTL = 600 * time.Millisecond }) // a refresh within the create
	m := c.instance(t)
	// The winner another instance will publish (created up front, under
	// other metadata so that our listing cannot adopt it early).
	winner, err := c.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: 5 * time.Minute})
	require.NoError(t, err)
	c.p.SetLatency(fp.OpCreate, 300*time.Millisecond)
	done := acquireAsync(m, "u", "p")
	// Once our create is under way, our lock "expires": another instance
	// takes it and publishes its sandbox.
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 2 }, 5*time.Second, time.Millisecond)
	c.stealLock(t, "u", "p")
	c.publish(t, "u", "p", winner.ID)

	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, winner.ID, r.id, "adopted the winner's sandbox")
	assert.Equal(t, []string{winner.ID}, c.p.Alive(), "its own sandbox was killed")
	assert.Equal(t, winner.ID, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "never overwrote the winner")
	assert.EqualValues(t, 1, m.Stats().LockLost)
	assert.Zero(t, m.Stats().RedisErrors, "a lock another instance holds is no Redis failure")
}

// A creator whose lock expired while the new holder found the creator's
// sandbox by metadata and published it keeps that sandbox: killing it would
// kill the pair's published sandbox.
func TestRedisLostLockKeepsItsSandboxWhenTheWinnerAdoptedIt(t *testing.T) {
	c, gate, m, done := acquireGated(t)
	ours := <-gate.created // made at the provider; the answer is held back
	c.stealLock(t, "u", "p")
	c.publish(t, "u", "p", ours) // the new holder found ours by metadata
	close(gate.proceed)

	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, ours, r.id)
	assert.Equal(t, []string{ours}, c.p.Alive(), "nothing killed")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill))
	assert.EqualValues(t, 1, m.Stats().LockLost)
	assert.Equal(t, ours, acquireID(t, m, "u", "p"))
}

// A creator whose lock expired with nothing published and nobody holding
// the lock keeps its sandbox: it retakes the lock and publishes, instead of
// killing a good sandbox and failing its callers.
func TestRedisLostLockWithNothingPublishedKeepsItsSandbox(t *testing.T) {
	c, gate, m, done := acquireGated(t)
	ours := <-gate.created
	c.expireLock(t, "u", "p")
	gate.proceed <- struct{}{}

	r := result(t, done)
	require.NoError(t, r.err)
	assert.Equal(t, ours, r.id)
	assert.Equal(t, []string{ours}, c.p.Alive(), "nothing killed")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill))
	assert.Equal(t, ours, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "published under the retaken lock")
	n, err := c.rdb.Exists(context.Background(), "sandboxpool:{u:p}:lock").Result()
	require.NoError(t, err)
	assert.Zero(t, n, "the retaken lock is let go")
	assert.EqualValues(t, 1, m.Stats().LockLost)
}

// A creator whose lock another creator now holds, with nothing published
// yet, kills its own sandbox, waits for the other creator and adopts what
// it publishes.
func TestRedisLostLockWaitsForTheNewHolder(t *testing.T) {
	c, gate, m, done := acquireGated(t)
	ours := <-gate.created
	c.stealLock(t, "u", "p")
	gate.proceed <- struct{}{}
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpKill) == 1 }, 5*time.Second, time.Millisecond, "ours is not the pair's: killed")

	// The new holder publishes its sandbox and lets the lock go.
	winner, err := c.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: 5 * time.Minute})
	require.NoError(t, err)
	c.publish(t, "u", "p", winner.ID)
	c.expireLock(t, "u", "p")

	r := result(t, done)
	require.NoError(t, r.err)
	assert.Equal(t, winner.ID, r.id)
	assert.NotEqual(t, ours, r.id)
	assert.Equal(t, []string{winner.ID}, c.p.Alive())
	assert.Empty(t, gate.created, "no second create")
	assert.EqualValues(t, 1, m.Stats().LockLost)
}

// A fill that loses its lock twice with nothing published stops and says
// so with ErrUnavailable: locks are vanishing, and the caller is told to
// retry rather than kept waiting.
func TestRedisLockLostTwiceIsUnavailable(t *testing.T) {
	c, gate, m, done := acquireGated(t)
	for i := range 2 {
		select {
		case <-gate.created:
		case r := <-done:
			t.Fatalf("create %d never came: Acquire returned %+v", i+1, r)
		}
		c.stealLock(t, "u", "p")
		gate.proceed <- struct{}{}
		require.Eventually(t, func() bool { return c.p.Calls(fp.OpKill) == int64(i+1) }, 5*time.Second, time.Millisecond)
		c.expireLock(t, "u", "p") // the other creator went away, publishing nothing
	}

	r := result(t, done)
	require.ErrorIs(t, r.err, sandboxpool.ErrUnavailable)
	assert.Contains(t, r.err.Error(), "create u/p")
	assert.Empty(t, c.p.Alive(), "both of ours killed, nothing else made")
	assert.Empty(t, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	assert.EqualValues(t, 2, m.Stats().LockLost)
}

// result waits for an acquireAsync's result, failing the test rather than
// hanging it when the Acquire never returns.
func result(t *testing.T, done <-chan acquireResult) acquireResult {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("Acquire did not return within 10s")
		return acquireResult{}
	}
}

// expireLock deletes the pair's create lock, as its expiry would.
func (c *cluster) expireLock(t *testing.T, user, project string) {
	t.Helper()
	require.NoError(t, c.rdb.Del(context.Background(), "sandboxpool:{"+user+":"+project+"}:lock").Err())
}

// acquireGated starts an Acquire of u/p on an instance whose creates wait
// for the test (see gatedCreate).
func acquireGated(t *testing.T) (*cluster, *gatedCreate, *sandboxpool.Manager, <-chan acquireResult) {
	c := newMiniCluster(t)
	gate := &gatedCreate{Provider: c.p, created: make(chan string, 1), proceed: make(chan struct{}, 1)}
	m := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Provider = gate })
	return c, gate, m, acquireAsync(m, "u", "p")
}

// gatedCreate holds back the answer of each create until the test sends on
// proceed (or closes it), as a slow network would after the provider acted.
type gatedCreate struct {
	*fp.Provider
	created chan string
	proceed chan struct{}
}

func (g *gatedCreate) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	sb, err := g.Provider.Create(ctx, req)
	if err == nil {
		g.created <- sb.ID
		<-g.proceed
	}
	return sb, err
}

// misanswering is a provider whose answers name another sandbox than the
// one it made or was asked for, or none, as a faulty provider's might.
type misanswering struct {
	*fp.Provider
	createID  func(id string) string // the id a create's answer names
	connectID func(id string) string // the id a connect's answer names
}

func (p *misanswering) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	sb, err := p.Provider.Create(ctx, req)
	if err == nil && p.createID != nil {
		sb.ID = p.createID(sb.ID)
	}
	return sb, err
}

func (p *misanswering) Connect(ctx context.Context, id string, timeout time.Duration) (sandboxpool.Sandbox, error) {
	sb, err := p.Provider.Connect(ctx, id, timeout)
	if err == nil && p.connectID != nil {
		sb.ID = p.connectID(sb.ID)
	}
	return sb, err
}

// A create answered without a sandbox id is an unknown outcome: the Manager
// finds the sandbox by its metadata and publishes its real id. Publishing an
// empty id would have made every instance read the pair as having no
// sandbox, and create another.
func TestProviderCreateWithoutIDIsFoundByMetadata(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Provider = &misanswering{Provider: c.p, createID: func(string) string { return "" }}
	})
	id := acquireID(t, m, "u", "p")
	assert.NotEmpty(t, id)
	assert.Equal(t, []string{id}, c.p.Alive())
	assert.Equal(t, id, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	st := m.Stats()
	assert.EqualValues(t, 1, st.CreateErrors)
	assert.EqualValues(t, 1, st.Reconciled)
	assert.Equal(t, id, acquireID(t, c.instance(t), "u", "p"), "another instance reuses it")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

// A reconnect answered with another sandbox's id fails closed: the pair
// keeps the sandbox Redis names, and nothing is created or killed. An
// answer that leaves the id out is the sandbox asked for.
func TestProviderConnectNamingAnotherSandboxFailsClosed(t *testing.T) {
	c := newMiniCluster(t)
	id := acquireID(t, c.instance(t), "u", "p")
	m := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Provider = &misanswering{Provider: c.p, connectID: func(string) string { return "iother" }}
	})
	_, err := m.Acquire(context.Background(), "u", "p")
	require.Error(t, err)
	assert.NotErrorIs(t, err, sandboxpool.ErrSandboxNotFound)
	assert.Contains(t, err.Error(), "another sandbox, iother")
	assert.Equal(t, id, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	assert.Equal(t, []string{id}, c.p.Alive())
	assert.Empty(t, c.p.Killed())

	blank := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Provider = &misanswering{Provider: c.p, connectID: func(string) string { return "" }}
	})
	assert.Equal(t, id, acquireID(t, blank, "u", "p"))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

// With several instances, a sandbox past MaxAge that another instance still
// leases is not killed by the instance that released it: the holder's
// keepalive keeps it alive, and once the holder releases it the provider
// deadline reaps it (no kill needed, none done under a lease).
func TestRedisMaxAgeNeverKillsAnotherInstancesLease(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	id := acquireID(t, a, "u", "p") // a used it and released it
	held, err := b.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	require.Equal(t, id, held.Sandbox().ID)

	// Past MaxAge with b's lease held throughout; both reapers tick.
	for range 20 * 12 {
		c.advance(5 * time.Second)
		a.ReapNow()
		b.ReapNow()
		_, alive := c.p.Deadline(id)
		require.True(t, alive, "killed under b's lease at %v", c.clock.Now())
	}
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill))
	next := acquireID(t, a, "u", "p")
	assert.NotEqual(t, id, next, "past MaxAge it is never handed out again")

	held.Release()
	b.ReapNow()
	dl, alive := c.p.Deadline(id)
	require.True(t, alive)
	assert.LessOrEqual(t, dl.Sub(c.clock.Now()), 5*time.Minute/2, "no holder left: its deadline is at most IdleTimeout/2 away")
	c.advance(5*time.Minute/2 + time.Second)
	_, alive = c.p.Deadline(id)
	assert.False(t, alive, "the provider reaped it")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill), "without a kill")
}

// The idle clock lives in Redis: an instance whose copy is idle does not
// kill a sandbox another instance keeps using.
func TestRedisIdleClockSharedAcrossInstances(t *testing.T) {
	c := newMiniCluster(t)
	a, b, id := c.sharing(t)
	for range 4 { // b uses it every 2 min; a never does
		c.advance(2 * time.Minute)
		require.Equal(t, id, acquireID(t, b, "u", "p"))
		b.ReapNow()
		a.ReapNow()
		_, alive := c.p.Deadline(id)
		require.True(t, alive, "a must not kill what b is using")
	}
	assert.EqualValues(t, 0, a.Stats().Evictions+b.Stats().Evictions)
	assert.EqualValues(t, 1, a.Stats().Active, "a learned the later deadline and kept its entry")

	// Now nobody uses it: both reap, the key goes, the sandbox dies.
	c.advance(6 * time.Minute)
	a.ReapNow()
	b.ReapNow()
	assert.Eventually(t, func() bool { return len(c.p.Alive()) == 0 }, 5*time.Second, time.Millisecond)
	assert.Empty(t, c.mr.Keys())
}

// Compare-and-delete: a stale remover never deletes a newer sandbox's key.
func TestRedisCompareAndDelete(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	old := acquireID(t, a, "u", "p")
	c.p.Vanish(old)
	c.advance(time.Minute)
	newer := acquireID(t, b, "u", "p") // b replaces it in Redis
	require.NotEqual(t, old, newer)
	// a still holds the old one and evicts it when idle.
	c.advance(4*time.Minute + 30*time.Second)
	a.ReapNow()
	require.Eventually(t, func() bool { return a.Stats().Active == 0 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, newer, c.mr.HGet("sandboxpool:{u:p}:sbx", "id"))
}

func TestRedisDownDegradesAndRecovers(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	hot := acquireID(t, m, "u", "hot")
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	assert.Equal(t, hot, acquireID(t, m, "u", "hot"), "memory hits need no Redis")
	cold := acquireID(t, m, "u", "cold") // created without the lock
	st := m.Stats()
	assert.EqualValues(t, 1, st.DegradedCreates)
	assert.Positive(t, st.RedisErrors)
	for range 3 {
		acquireID(t, m, "u", fmt.Sprint("more", st.RedisErrors))
	}
	assert.True(t, m.Stats().RedisDegraded, "the breaker opened")
	assert.EqualValues(t, 2, m.Stats().UnpublishedSandboxes, "u/cold and u/more…")

	c.mr.SetError("")
	require.Eventually(t, func() bool { return !m.Stats().RedisDegraded }, 5*time.Second, 5*time.Millisecond, "the probe closes the breaker with no traffic")
	require.Eventually(t, func() bool { return c.mr.HGet("sandboxpool:{u:cold}:sbx", "id") == cold }, 5*time.Second, 5*time.Millisecond,
		"the outage's sandbox is published on recovery")
	require.Eventually(t, func() bool { return m.Stats().UnpublishedSandboxes == 0 }, 5*time.Second, 5*time.Millisecond)
}

// An idle sandbox whose pair Redis cannot answer for (it is down) is
// dropped from memory but not killed: another instance may be using it,
// and only Redis's idle clock could say. Its provider deadline, which only
// a keepalive pushes, reaps it if nobody uses it.
func TestRedisDownIdleEvictionForgetsWithoutKilling(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	id := acquireID(t, m, "u", "p")
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	c.advance(5*time.Minute + time.Second) // past IdleTimeout
	m.ReapNow()
	st := m.Stats()
	assert.Zero(t, st.Active)
	assert.EqualValues(t, 1, st.Evictions)
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill), "killed a sandbox another instance may lease")
	assert.NotContains(t, c.p.Killed(), id)
}

// Two instances that each made the pair a sandbox while Redis was down
// converge once it answers: the background probe of one publishes its
// sandbox, the other's finds Redis naming another, retires its own
// (superseded, left to its provider deadline: another instance may have
// adopted it) and serves the published one.
func TestRedisOutageDuplicatesConvergeOnRecovery(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	c.p.SetLatency(fp.OpCreate, 100*time.Millisecond) // neither finds the other's by metadata
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	ra, rb := acquireAsync(a, "u", "p"), acquireAsync(b, "u", "p")
	ida, idb := result(t, ra), result(t, rb)
	require.NoError(t, ida.err)
	require.NoError(t, idb.err)
	require.NotEqual(t, ida.id, idb.id, "no duplicate to converge")
	c.mr.SetError("")

	require.Eventually(t, func() bool {
		return a.Stats().Superseded+b.Stats().Superseded == 1
	}, 5*time.Second, 5*time.Millisecond, "neither retired its duplicate")
	published := c.mr.HGet("sandboxpool:{u:p}:sbx", "id")
	assert.Contains(t, []string{ida.id, idb.id}, published)
	assert.Equal(t, published, servedID(a, "u", "p"))
	assert.Equal(t, published, servedID(b, "u", "p"))
}

// A pair removed and acquired again while Redis is down keeps the sandbox
// created for it when Redis answers again: the removal's record deletion
// is made before the outage's sandboxes are published. Before, the
// publication came first, found the record still naming the removed
// sandbox, and retired the new one as a duplicate of it; the removal then
// deleted the record, and the pair was named nowhere, its sandbox out of
// every pool, until an Acquire found it again by metadata.
//
// The publication also waits until the removal is made: here Redis
// answers again but fails the removal's record deletion for a while.
func TestRedisOutageRemoveThenAcquireKeepsTheNewSandbox(t *testing.T) {
	c := newMiniCluster(t)
	var holding atomic.Bool
	var old atomic.Value
	hook := &faultHook{key: "sandboxpool:{u:p}:sbx", fate: func(_ int, cmd redis.Cmder) fate {
		if holding.Load() && slices.Contains(cmd.Args(), old.Load()) {
			return fail
		}
		return pass
	}}
	a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Redis = c.client(t, hook) })
	b := c.instance(t)
	old.Store(acquireID(t, a, "u", "p"))
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	require.ErrorIs(t, a.Remove(context.Background(), "u", "p"), sandboxpool.ErrUnavailable)
	fresh := acquireID(t, a, "u", "p")
	require.NotEqual(t, old.Load(), fresh)
	require.EqualValues(t, 1, a.Stats().UnannouncedRemovals)
	require.EqualValues(t, 1, a.Stats().UnpublishedSandboxes)
	holding.Store(true)
	c.mr.SetError("")

	var seen sandboxpool.Stats
	assert.Never(t, func() bool {
		seen = a.Stats()
		return seen.UnannouncedRemovals == 0 || seen.UnpublishedSandboxes == 0 || seen.Superseded > 0
	}, 300*time.Millisecond, 5*time.Millisecond, "published before the removal was made: %+v", &seen)
	assert.Equal(t, old.Load(), c.mr.HGet("sandboxpool:{u:p}:sbx", "id"))
	holding.Store(false)

	require.Eventually(t, func() bool {
		st := a.Stats()
		return st.UnannouncedRemovals == 0 && st.UnpublishedSandboxes == 0
	}, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, fresh, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	assert.Zero(t, a.Stats().Superseded, "the new sandbox was retired as a duplicate of the removed one")
	assert.Equal(t, fresh, acquireID(t, a, "u", "p"))
	assert.Equal(t, fresh, acquireID(t, b, "u", "p"), "another instance reuses it")
	assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
}

// A sandbox retired at MaxAge while a lease still holds it keeps its record
// alive past MaxAge (the holder's keepalive pushes it), though no Acquire
// will be given that sandbox again. A sandbox created for the pair while
// Redis is down is published over that record on recovery. Before, the
// publication took the record for the canonical sandbox and retired the new
// one as its duplicate, with a warning: the pair was named by a sandbox past
// MaxAge, and its next Acquire found the new one again only by listing the
// provider's sandboxes.
func TestRedisOutageSandboxIsPublishedOverARecordPastMaxAge(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	old := c.recordPastMaxAge(t, a)

	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	fresh := acquireID(t, a, "u", "p")
	require.NotEqual(t, old, fresh)
	require.EqualValues(t, 1, a.Stats().UnpublishedSandboxes)
	c.mr.SetError("")

	require.Eventually(t, func() bool { return a.Stats().UnpublishedSandboxes == 0 }, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, fresh, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "published over the record past MaxAge")
	assert.Zero(t, a.Stats().Superseded, "the new sandbox was retired as a duplicate of one past MaxAge")
	assert.Equal(t, fresh, acquireID(t, a, "u", "p"))
	assert.Equal(t, fresh, acquireID(t, b, "u", "p"), "another instance reuses it")
	assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
}

// recordPastMaxAge leases the pair (u, p) on m and holds the lease while
// the clock runs past MaxAge: the sandbox is retired, and the holder's
// keepalive keeps its record alive. It returns the sandbox's id.
func (c *cluster) recordPastMaxAge(t *testing.T, m *sandboxpool.Manager) string {
	t.Helper()
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	t.Cleanup(l.Release) // before m closes
	for range (c.base.MaxAge + 30*time.Second) / (5 * time.Second) {
		c.advance(5 * time.Second)
		m.ReapNow()
	}
	require.EqualValues(t, 1, m.Stats().Evictions, "retired at MaxAge")
	require.Equal(t, l.Sandbox().ID, c.mr.HGet("sandboxpool:{u:p}:sbx", "id"), "the holder's keepalive kept the record")
	created, err := strconv.ParseInt(c.mr.HGet("sandboxpool:{u:p}:sbx", "created"), 10, 64)
	require.NoError(t, err)
	require.LessOrEqual(t, created+c.base.MaxAge.Milliseconds(), c.clock.Now().UnixMilli())
	return l.Sandbox().ID
}

// A sandbox that Redis does not name yet (created while Redis was down,
// and not published when the reaper comes first) is not taken for a
// duplicate of a record past MaxAge: its keepalive writes it over that
// record, as the publication would, and its idle eviction is an eviction.
// Before, both took the record for the canonical sandbox, and retired the
// sandbox as its duplicate, with a warning (the sandbox in use, at its
// keepalive).
func TestRedisReaperIgnoresARecordPastMaxAge(t *testing.T) {
	for _, leased := range []bool{true, false} {
		t.Run(map[bool]string{true: "keepalive", false: "idle eviction"}[leased], func(t *testing.T) {
			c := newMiniCluster(t)
			a := c.instance(t, func(cfg *sandboxpool.Config) { sandboxpool.SlowRedisProbe(cfg, time.Hour) }) // no publication: the reaper comes first
			old := c.recordPastMaxAge(t, a)

			c.mr.SetError("LOADING Redis is loading the dataset in memory")
			l, err := a.Acquire(context.Background(), "u", "p")
			require.NoError(t, err)
			fresh := l.Sandbox().ID
			require.NotEqual(t, old, fresh)
			require.EqualValues(t, 1, a.Stats().UnpublishedSandboxes)
			if !leased {
				l.Release()
			}
			c.mr.SetError("")

			time.Sleep(50 * time.Millisecond) // past the breaker's cooldown: the reaper's calls reach Redis
			evicted := a.Stats().Evictions
			for range (c.base.IdleTimeout + 10*time.Second) / (5 * time.Second) { // its keepalives, or its idle deadline
				c.advance(5 * time.Second)
				a.ReapNow()
			}
			assert.Zero(t, a.Stats().Superseded, "retired as a duplicate of a sandbox past MaxAge")
			if !leased {
				assert.Equal(t, evicted+1, a.Stats().Evictions, "evicted when idle")
				assert.Equal(t, old, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "an eviction writes nothing")
				return
			}
			l.Release()
			assert.Equal(t, fresh, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the keepalive wrote it over the record past MaxAge")
			assert.Equal(t, fresh, acquireID(t, a, "u", "p"))
			assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
		})
	}
}

// The reaper, when it comes before the recovery's catch-up (it ticks while
// the breaker lets calls through again), leaves a sandbox created while
// Redis was down to the catch-up while removals wait: the pair's record may
// still name a sandbox this instance removed during the outage. Its
// keepalive writes nothing to Redis, and its idle eviction is an eviction.
// Before, both read that record as the pair's sandbox and retired the new
// one as its duplicate, the fault the catch-up's order
// (TestRedisOutageRemoveThenAcquireKeepsTheNewSandbox) had closed for the
// publication only.
func TestRedisReaperBeforeTheCatchUpKeepsTheNewSandbox(t *testing.T) {
	for _, leased := range []bool{true, false} {
		t.Run(map[bool]string{true: "keepalive", false: "idle eviction"}[leased], func(t *testing.T) {
			c := newMiniCluster(t)
			a := c.instance(t, func(cfg *sandboxpool.Config) { sandboxpool.SlowRedisProbe(cfg, time.Hour) }) // the reaper comes first
			b := c.instance(t)
			old := acquireID(t, a, "u", "p")
			c.mr.SetError("LOADING Redis is loading the dataset in memory")
			require.ErrorIs(t, a.Remove(context.Background(), "u", "p"), sandboxpool.ErrUnavailable)
			l, err := a.Acquire(context.Background(), "u", "p")
			require.NoError(t, err)
			fresh := l.Sandbox().ID
			require.NotEqual(t, old, fresh)
			require.EqualValues(t, 1, a.Stats().UnannouncedRemovals)
			c.mr.SetError("")
			time.Sleep(50 * time.Millisecond) // past the breaker's cooldown: the reaper's calls reach Redis

			until := c.clock.Now().Add(c.base.IdleTimeout + time.Minute)
			if !leased {
				l.Release()
				evicted := a.Stats().Evictions
				for a.Stats().Evictions == evicted && a.Stats().Superseded == 0 { // to its idle deadline
					// Redis's clock stands still: the removed sandbox's record
					// outlives the new one's idle deadline, as another
					// instance's keepalive would make it.
					require.True(t, c.clock.Now().Before(until), "never left the pool")
					c.clock.Advance(5 * time.Second)
					a.ReapNow()
				}
				assert.Zero(t, a.Stats().Superseded, "retired as a duplicate of the removed sandbox")
				assert.Equal(t, evicted+1, a.Stats().Evictions, "evicted when idle")
				assert.Equal(t, old, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "nothing written before the removal is made")
				return
			}
			defer l.Release()
			touches := a.Stats().Touches
			for a.Stats().Touches == touches { // to the new sandbox's first keepalive
				require.True(t, c.clock.Now().Before(until), "no keepalive")
				c.advance(5 * time.Second)
				a.ReapNow()
			}
			assert.Zero(t, a.Stats().Superseded, "the new sandbox was retired as a duplicate of the removed one")
			assert.Equal(t, old, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "nothing written before the removal is made")
			assert.EqualValues(t, 1, a.Stats().UnannouncedRemovals)

			require.NoError(t, a.Close(context.Background())) // the catch-up
			assert.Equal(t, fresh, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
			assert.Equal(t, fresh, acquireID(t, b, "u", "p"), "another instance reuses it")
			assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
		})
	}
}

// A Remove while Redis is down kills the pair's sandbox and says that
// Redis failed as ErrUnavailable, which a service answers with 503 and a
// retry finishes; before, it was an unclassified error (500 in the example
// service).
func TestRedisDownRemoveKillsAndIsUnavailable(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	id := acquireID(t, m, "u", "p")
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	err := m.Remove(context.Background(), "u", "p")
	require.ErrorIs(t, err, sandboxpool.ErrUnavailable)
	assert.Contains(t, c.p.Killed(), id)
	assert.Empty(t, c.p.Alive())

	c.mr.SetError("")
	require.NoError(t, m.Remove(context.Background(), "u", "p"), "tried again, it finishes")
	assert.Empty(t, c.keys(t))
}

// A sandbox created while Redis was down takes its quota place when it is
// published on recovery, so the quotas count it across instances at once.
// Before, nothing counted it until its next keepalive, which an idle
// sandbox never has: other instances' creates passed the quotas over it.
func TestRedisOutageSandboxTakesItsQuotaPlaceOnRecovery(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 2 })
	a, b := c.instance(t), c.instance(t)
	acquireID(t, a, "u", "hot")
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	cold := acquireID(t, a, "u", "cold") // created without the lock, within a's own count
	require.EqualValues(t, 1, a.Stats().DegradedCreates)
	c.mr.SetError("")
	require.Eventually(t, func() bool { return c.mr.HGet("sandboxpool:{u:cold}:sbx", "id") == cold }, 5*time.Second, 5*time.Millisecond,
		"published on recovery")
	require.Eventually(t, func() bool {
		places, _ := c.mr.ZMembers("sandboxpool:live")
		return slices.Contains(places, "u:cold")
	}, 5*time.Second, 5*time.Millisecond, "with its quota place, written just after the record")

	_, err := b.Acquire(context.Background(), "v", "q") // nothing local: Redis decides
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "u/hot and u/cold hold both places")
	assert.EqualValues(t, 2, c.p.Calls(fp.OpCreate))
}

func TestRedisDownRefusesCreatesWhenConfigured(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.RefuseCreatesWhenDegraded = true })
	m := c.instance(t)
	hot := acquireID(t, m, "u", "hot")
	c.mr.SetError("ERR down")
	_, err := m.Acquire(context.Background(), "u", "cold")
	require.ErrorIs(t, err, sandboxpool.ErrUnavailable)
	assert.Equal(t, hot, acquireID(t, m, "u", "hot"))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

func TestRedisQuotasAcrossInstances(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 10; cfg.MaxPerUser = 3 })
	ms := []*sandboxpool.Manager{c.instance(t), c.instance(t), c.instance(t), c.instance(t)}
	var mu sync.Mutex
	created, refused := map[string]int{}, 0
	var wg sync.WaitGroup
	for u := range 6 {
		for p := range 5 {
			wg.Go(func() {
				m := ms[(u+p)%len(ms)]
				l, err := m.Acquire(context.Background(), fmt.Sprint("user", u), fmt.Sprint("p", p))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					assert.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
					refused++
					return
				}
				created[fmt.Sprint("user", u)]++
				l.Release()
			})
		}
	}
	wg.Wait()
	total := 0
	for u, n := range created {
		assert.LessOrEqual(t, n, 3, u)
		total += n
	}
	assert.Equal(t, 10, total, "exactly MaxSandboxes across instances")
	assert.Equal(t, 20, refused)
	assert.Len(t, c.p.Alive(), 10)
}

func TestRedisCreateRateLimitAcrossInstances(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		cfg.CreateLimit = sandboxpool.RateLimit{Rate: 2, Burst: 2, Per: time.Hour}
	})
	a, b := c.instance(t), c.instance(t)
	acquireID(t, a, "u", "1")
	acquireID(t, b, "u", "2")
	_, err := a.Acquire(context.Background(), "u", "3")
	require.ErrorIs(t, err, sandboxpool.ErrRateLimited)
	ra, ok := sandboxpool.RetryAfter(err)
	require.True(t, ok)
	assert.Positive(t, ra)
	_, err = b.Acquire(context.Background(), "u", "4")
	require.ErrorIs(t, err, sandboxpool.ErrRateLimited)
	acquireID(t, b, "u", "1") // reuse is never limited
	acquireID(t, a, "v", "1") // other users are not limited
	assert.EqualValues(t, 3, c.p.Calls(fp.OpCreate))
}

// After every pair is reaped no key is left behind, quota sets included.
func TestRedisNoStaleKeysAfterReaping(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 100; cfg.MaxPerUser = 10 })
	m := c.instance(t)
	for i := range 20 {
		acquireID(t, m, fmt.Sprint("u", i%4), fmt.Sprint("p", i))
	}
	assert.Len(t, c.mr.Keys(), 20+1+4, "records, the global set, the user sets")
	c.advance(6 * time.Minute)
	m.ReapNow()
	require.Eventually(t, func() bool { return len(c.p.Alive()) == 0 && len(c.mr.Keys()) == 0 }, 5*time.Second, 5*time.Millisecond,
		"left: %v", c.mr.Keys())
}

// Forgetting a replaced sandbox leaves its pair's quota place to the
// replacement: MaxSandboxes still counts the pair.
func TestRedisReplacementKeepsItsQuotaPlace(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 1 })
	a, b, third := c.instance(t), c.instance(t), c.instance(t)
	old := acquireID(t, a, "u", "p")
	c.advance(15 * time.Minute) // MaxAge: b creates and publishes a replacement
	next := acquireID(t, b, "u", "p")
	require.NotEqual(t, old, next)
	a.ReapNow() // then a forgets the old one
	require.EqualValues(t, 0, a.Stats().Active)
	_, err := third.Acquire(context.Background(), "u", "q") // nothing local: Redis decides
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "the pair u/p still holds the only place")
	assert.Equal(t, next, acquireID(t, a, "u", "p"))
}

// A sandbox in use keeps its quota place when Redis loses its data: the
// keepalive that writes the pair's record again counts the pair again, so
// MaxSandboxes holds across instances. Before, the keepalive only moved
// places that still existed, and a pair in use went uncounted until its
// sandbox ended.
func TestRedisKeepaliveRestoresQuotaPlaceAfterDataLoss(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t, func(cfg *sandboxpool.Config) {
			cfg.IdleTimeout, cfg.MaxAge, cfg.MaxSandboxes, cfg.MaxPerUser = time.Hour, 3*time.Hour, 1, 1
		})
		a, b := c.instance(t), c.instance(t)
		held, err := a.Acquire(context.Background(), "u", "p")
		require.NoError(t, err)
		defer held.Release()
		require.NoError(t, c.rdb.FlushAll(context.Background()).Err())

		c.advance(50 * time.Minute) // within the touch lead of its 1 h deadline
		a.ReapNow()
		require.Equal(t, held.Sandbox().ID, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the keepalive wrote the record again")
		_, err = b.Acquire(context.Background(), "v", "q") // nothing local: Redis decides
		require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "u/p holds the only place again")
		_, err = b.Acquire(context.Background(), "u", "q")
		require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "and the only place of user u")
		assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	})
}

// createInFlight starts an Acquire of the pair on a new instance whose
// creates wait for open, and returns once its create has begun, under the
// pair's lock; acquired then yields the sandbox's id. Test cleanup opens
// the gate before the instances close, since Close waits for the create.
func (c *cluster) createInFlight(t *testing.T, user, project string) (open func(), acquired <-chan string) {
	t.Helper()
	gated := &gatedCreates{Provider: c.p, gate: make(chan struct{})}
	a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Provider = gated })
	open = sync.OnceFunc(func() { close(gated.gate) })
	t.Cleanup(open) // registered after the instances, so it runs before their Close
	ids := make(chan string, 1)
	go func() {
		l, err := a.Acquire(context.Background(), user, project)
		if !assert.NoError(t, err) {
			ids <- "" // the failure is recorded; the reader goes on
			return
		}
		ids <- l.Sandbox().ID
		l.Release()
	}()
	require.Eventually(t, gated.entered.Load, 5*time.Second, time.Millisecond)
	return open, ids
}

// A create waiting for a pair's lock leaves the pair's quota place as the
// instance creating under the lock reserved it. Before, the waiter's own
// reservation of the place (the pair's, shared by every creator of it)
// moved its expiry to the waiter's shorter CreateTimeout, and once that
// passed, a create of another pair took the place of the sandbox still
// being made: two sandboxes under MaxSandboxes 1.
func TestRedisLockWaiterKeepsTheCreatorsQuotaPlace(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 1 })
	impatient := c.instance(t, func(cfg *sandboxpool.Config) { cfg.CreateTimeout = 100 * time.Millisecond })
	third := c.instance(t)
	open, acquired := c.createInFlight(t, "u", "p")
	_, err := impatient.Acquire(context.Background(), "u", "p")
	require.ErrorIs(t, err, context.DeadlineExceeded, "its CreateTimeout ended while a held the lock")
	c.advance(time.Second) // past the waiter's CreateTimeout, well within a's

	_, err = third.Acquire(context.Background(), "v", "q") // nothing local: Redis decides
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "a's create in flight holds the only place")
	open()
	<-acquired
	_, err = third.Acquire(context.Background(), "v", "q")
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "u/p holds the only place")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

// A create that finds the pair's place already there leaves it: most such
// creates wait for the pair's lock and take the sandbox its holder
// publishes. Before, the reservation moved the place to the waiter's own
// provisional expiry; when the holder had already published by then (it
// set the place to its sandbox's deadline), the place stayed CreateTimeout
// ahead, past the sandbox's end, and counted it after it was gone. The
// soak, which checks for keys left once every sandbox has ended, found it.
func TestRedisLockWaiterLeavesNoPlacePastTheSandbox(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		cfg.MaxSandboxes, cfg.MaxPerUser, cfg.IdleTimeout, cfg.CreateTimeout = 10, 10, time.Minute, time.Hour
	})
	open, acquired := c.createInFlight(t, "u", "p")
	var published string
	// The waiter has missed the record: its reservation goes out once the
	// holder has published and released the lock.
	waiter := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Redis = c.client(t, &onFirst{arg: "sandboxpool:{u}:live", do: func() { open(); published = <-acquired }})
	})
	l, err := waiter.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l.Release()
	require.Equal(t, published, l.Sandbox().ID, "the waiter took the holder's sandbox")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))

	deadline, err := strconv.ParseFloat(c.hget(t, "sandboxpool:{u:p}:sbx", "deadline"), 64)
	require.NoError(t, err)
	for _, set := range []string{"sandboxpool:{u}:live", "sandboxpool:live"} {
		score, err := c.rdb.ZScore(context.Background(), set, "u:p").Result()
		require.NoError(t, err)
		assert.Equal(t, deadline, score, "%s: the place ends with the sandbox, not at the waiter's CreateTimeout", set)
	}
}

// A create that holds the pair's lock and finds nothing published moves
// the place it found (an earlier sandbox's, about to expire) to its own
// expiry: the place does not lapse while the create runs, and a create of
// another pair cannot take it meanwhile. Its reservation left the place as
// it was (see TestRedisLockWaiterLeavesNoPlacePastTheSandbox).
func TestRedisCreateUnderTheLockExtendsThePlaceItFound(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes, cfg.IdleTimeout = 1, time.Minute })
	ending := c.clock.Now().Add(time.Second).UnixMilli() // an earlier sandbox of u/p
	require.NoError(t, c.rdb.ZAdd(context.Background(), "sandboxpool:live", redis.Z{Score: float64(ending), Member: "u:p"}).Err())
	other := c.instance(t)
	open, acquired := c.createInFlight(t, "u", "p")
	c.advance(time.Minute) // past the place's old expiry, within the create's CreateTimeout

	_, err := other.Acquire(context.Background(), "v", "q")
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "u/p's create in flight holds the only place")
	open()
	<-acquired
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

// onFirst is a go-redis hook that runs do before the first command with
// arg among its arguments is sent.
type onFirst struct {
	passHook
	arg  string
	once sync.Once
	do   func()
}

func (h *onFirst) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if slices.Contains(cmd.Args(), any(h.arg)) {
			h.once.Do(h.do)
		}
		return next(ctx, cmd)
	}
}

// The largest time.Duration means no limit across instances too. A create
// in flight keeps its quota place (its provisional place is scored at now +
// CreateTimeout, a sum that overflowed, so the place read as long expired
// and another instance's create took it), and another instance reconnects
// to the pair's sandbox rather than read it as past MaxAge.
func TestRedisLongestDurationsMeanNoLimit(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		cfg.IdleTimeout, cfg.MaxAge, cfg.CreateTimeout, cfg.LockTTL = math.MaxInt64, math.MaxInt64, math.MaxInt64, math.MaxInt64
		cfg.MaxSandboxes = 1
	})
	b := c.instance(t)
	open, acquired := c.createInFlight(t, "u", "p")
	_, err := b.Acquire(context.Background(), "v", "q")
	require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded, "the create in flight holds the only place")
	open()
	id := <-acquired

	c.advance(time.Hour)
	l, err := b.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	assert.Equal(t, id, l.Sandbox().ID)
	assert.Equal(t, sandboxpool.OutcomeCacheHit, l.Outcome())
	l.Release()
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	ttl := c.mr.TTL("sandboxpool:{u:p}:sbx")
	assert.Greater(t, ttl, 50*365*24*time.Hour, "the record lives as long as the sandbox may")
	assert.LessOrEqual(t, ttl, sandboxpool.MaxDuration)
}

// supersedeRecord makes the pair's Redis record name another sandbox of the
// pair, as a creator whose lock expired, or an instance reconciling after a
// Redis outage, may leave it; it returns that sandbox's id.
func (c *cluster) supersedeRecord(t *testing.T, user, project string) string {
	t.Helper()
	sb, err := c.p.Create(context.Background(), sandboxpool.CreateRequest{Timeout: time.Hour,
		Metadata: map[string]string{sandboxpool.MetaNamespace: "sandboxpool", sandboxpool.MetaUser: user, sandboxpool.MetaProject: project}})
	require.NoError(t, err)
	key := "sandboxpool:{" + user + ":" + project + "}:sbx"
	ctx := context.Background()
	require.NoError(t, c.rdb.HSet(ctx, key, "id", sb.ID).Err())
	require.NoError(t, c.rdb.PExpireAt(ctx, key, c.clock.Now().Add(time.Hour)).Err())
	if c.mr != nil {
		c.mr.SetTime(c.clock.Now())
	}
	return sb.ID
}

// A duplicate the pair's Redis record does not name converges: the holder's
// next keepalive finds it superseded, stops handing it out and serves the
// named one, keeps its own lease alive, and kills nothing (another instance
// may hold it); no longer extended, it dies at its provider deadline.
func TestRedisSupersededDuplicateConverges(t *testing.T) {
	c := newMiniCluster(t)
	a := c.instance(t)
	held, err := a.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	dup := held.Sandbox().ID
	named := c.supersedeRecord(t, "u", "p")
	assert.Equal(t, dup, acquireID(t, a, "u", "p"), "before a keepalive, memory still serves its copy")

	c.advance(4 * time.Minute) // inside the touch lead of its 5 min deadline, still leased
	a.ReapNow()
	require.EqualValues(t, 1, a.Stats().Superseded)
	dl, alive := c.p.Deadline(dup)
	require.True(t, alive, "leased: kept alive")
	assert.LessOrEqual(t, dl.Sub(c.clock.Now()), 5*time.Minute/2, "retired: extended by IdleTimeout/2, not a whole IdleTimeout")

	l, err := a.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	assert.Equal(t, named, l.Sandbox().ID, "the sandbox Redis names")
	assert.Equal(t, sandboxpool.OutcomeCacheHit, l.Outcome())
	l.Release()

	held.Release()
	require.Eventually(t, func() bool { return a.Scheduled() == 1 }, 5*time.Second, time.Millisecond, "the duplicate is forgotten at its last release")
	_, alive = c.p.Deadline(dup)
	assert.True(t, alive, "not killed")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill))
	c.advance(5*time.Minute/2 + time.Second)
	_, alive = c.p.Deadline(dup)
	assert.False(t, alive, "its provider deadline reaped it")
	assert.Equal(t, named, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the named sandbox's record is untouched")
}

// An idle copy that Redis no longer names is dropped without a kill: the
// record's sandbox is the pair's, and the copy may be another instance's.
func TestRedisIdleSupersededCopyIsNotKilled(t *testing.T) {
	c := newMiniCluster(t)
	a := c.instance(t)
	dup := acquireID(t, a, "u", "p")
	c.supersedeRecord(t, "u", "p")
	c.advance(6 * time.Minute)
	a.ReapNow()
	require.Eventually(t, func() bool { return a.Scheduled() == 0 }, 5*time.Second, time.Millisecond)
	assert.EqualValues(t, 1, a.Stats().Superseded)
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill), "%s was not ours to kill", dup)
}

// After Template changes (a deploy), an instance with the new one reuses
// the pair's sandbox of the old one (Sandbox.Template says which) until it
// reaches MaxAge, and then creates it anew from the new template.
func TestRedisTemplateChangeMovesPairsAtMaxAge(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.IdleTimeout = 10 * time.Minute })
	old := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Template = "v1" })
	id := acquireID(t, old, "u", "p")
	deployed := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Template = "v2" })
	l, err := deployed.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	assert.Equal(t, id, l.Sandbox().ID, "reused")
	assert.Equal(t, "v1", l.Sandbox().Template)
	l.Release()

	c.advance(9 * time.Minute) // used within IdleTimeout, so still alive at MaxAge
	acquireID(t, deployed, "u", "p")
	c.advance(6 * time.Minute)
	l, err = deployed.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l.Release()
	assert.NotEqual(t, id, l.Sandbox().ID, "past MaxAge: a new sandbox")
	assert.Equal(t, "v2", l.Sandbox().Template)
}

// A copy used recently, so unleased but not idle, whose keepalive finds
// that Redis names another sandbox, is retired there and not extended: no
// lease of this instance needs it, and it may be another instance's.
func TestRedisSupersededUnleasedCopyIsNotExtended(t *testing.T) {
	c := newMiniCluster(t)
	a := c.instance(t)
	l, err := a.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	dup := l.Sandbox().ID
	c.advance(time.Minute)
	l.Release() // idle until 6 min, past its 5 min provider deadline
	c.supersedeRecord(t, "u", "p")
	dl, _ := c.p.Deadline(dup)

	c.advance(3 * time.Minute) // inside the touch lead of that deadline: a keepalive is due
	a.ReapNow()
	require.EqualValues(t, 1, a.Stats().Superseded)
	assert.EqualValues(t, 0, a.Stats().Touches)
	assert.EqualValues(t, 0, c.p.Calls(fp.OpSetTimeout), "a superseded copy no lease needs is not extended")
	got, alive := c.p.Deadline(dup)
	assert.True(t, alive && got.Equal(dl), "its provider deadline is left as it was")
	require.Eventually(t, func() bool { return a.Scheduled() == 0 }, 5*time.Second, time.Millisecond, "forgotten")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill), "%s was not ours to kill", dup)
}

// When Redis loses its data (a restart without persistence), the next
// keepalive of a sandbox in use writes its record again, so every instance
// keeps agreeing on it and none mistakes it for an idle one.
func TestRedisKeepaliveRewritesALostRecord(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t, func(cfg *sandboxpool.Config) { cfg.IdleTimeout = time.Hour; cfg.MaxAge = 3 * time.Hour })
		a, b := c.instance(t), c.instance(t)
		held, err := a.Acquire(context.Background(), "u", "p")
		require.NoError(t, err)
		defer held.Release()
		id := held.Sandbox().ID
		require.NoError(t, c.rdb.FlushAll(context.Background()).Err())

		c.advance(50 * time.Minute) // within the touch lead of its 1 h deadline
		a.ReapNow()
		assert.Equal(t, id, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the keepalive wrote the record again")
		dl, _ := c.p.Deadline(id)
		assert.Equal(t, strconv.FormatInt(dl.UnixMilli(), 10), c.hget(t, "sandboxpool:{u:p}:sbx", "deadline"), "with the deadline it pushed")
		l, err := b.Acquire(context.Background(), "u", "p")
		require.NoError(t, err)
		defer l.Release()
		assert.Equal(t, id, l.Sandbox().ID)
		assert.EqualValues(t, 0, b.Stats().Adopted, "found through Redis, not by metadata")
		assert.EqualValues(t, 0, a.Stats().Superseded+b.Stats().Superseded)
	})
}

// After Redis loses its data, an instance whose copy went idle does not kill
// the sandbox another instance is using, even before that instance's next
// keepalive writes the record again.
func TestRedisDataLossNeverKillsAnotherInstancesLease(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	id := acquireID(t, a, "u", "p") // a used it once; its copy idles from now
	held, err := b.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer held.Release()
	require.Equal(t, id, held.Sandbox().ID)
	c.advance(4 * time.Minute)
	b.ReapNow() // b's keepalive pushes the deadline (and the record) ahead
	require.NoError(t, c.rdb.FlushAll(context.Background()).Err())

	c.advance(time.Minute + time.Second) // a's idle deadline passes; the record is gone
	a.ReapNow()
	require.Eventually(t, func() bool { return a.Stats().Active == 0 }, 5*time.Second, time.Millisecond, "a dropped its idle copy")
	_, alive := c.p.Deadline(id)
	assert.True(t, alive, "killed under b's lease")
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill))
	c.advance(3 * time.Minute) // to b's next keepalive, a touch lead before the deadline it pushed
	b.ReapNow()
	assert.Equal(t, id, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "b's next keepalive wrote the record again")
	_, alive = c.p.Deadline(id)
	assert.True(t, alive)
}

// waitSubscribers waits until n clients listen for removals in the default
// namespace (each Manager with Redis subscribes when it starts).
func (c *cluster) waitSubscribers(t *testing.T, n int64) {
	t.Helper()
	require.Eventually(t, func() bool {
		got, err := c.rdb.PubSubNumSub(context.Background(), "sandboxpool:removed").Result()
		return err == nil && got["sandboxpool:removed"] >= n
	}, 5*time.Second, 5*time.Millisecond)
}

// A Remove on one instance makes every instance forget the sandbox at once:
// another instance that held it in memory no longer hands it out, where it
// used to until its next probe (HealthCheckAfter later).
func TestRedisRemoveForgetsOnEveryInstance(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t)
		a, b, id := c.sharing(t)
		c.waitSubscribers(t, 2)
		require.NoError(t, a.Remove(context.Background(), "u", "p"))
		require.Eventually(t, func() bool { return b.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
			"the other instance forgets the removed sandbox")
		next := acquireID(t, b, "u", "p")
		assert.NotEqual(t, id, next)
		assert.Equal(t, []string{next}, c.p.Alive())
		assert.Equal(t, next, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	})
}

// A Remove waits for a create of the pair in flight on another instance
// (it holds the pair's lock) and removes what that create made. Before, it
// found nothing yet, and the sandbox published after it survived the
// Remove, named in Redis.
func TestRedisRemoveWaitsForAnotherInstancesCreate(t *testing.T) {
	c := newMiniCluster(t)
	b := c.instance(t)
	open, acquired := c.createInFlight(t, "u", "p")
	removed := make(chan error, 1)
	go func() { removed <- b.Remove(context.Background(), "u", "p") }()
	require.Never(t, func() bool { return len(removed) > 0 }, 200*time.Millisecond, 5*time.Millisecond,
		"Remove returned while the pair's create was in flight")
	open()
	id := <-acquired
	require.NoError(t, <-removed)
	assert.Contains(t, c.p.Killed(), id, "the create's sandbox was removed")
	assert.Empty(t, c.p.Alive())
	assert.Empty(t, c.keys(t), "no record, no lock")

	shortCtx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	open, _ = c.createInFlight(t, "u", "q")
	require.ErrorIs(t, b.Remove(shortCtx, "u", "q"), context.DeadlineExceeded, "its caller gave up first")
	open()
}

// listGate, once armed, holds the next List until the test lets it go, so
// that an Acquire can run while a Remove is between its kill and its
// listing.
type listGate struct {
	*fp.Provider
	armed            atomic.Bool
	listing, proceed chan struct{}
}

func (g *listGate) List(ctx context.Context, md map[string]string) ([]sandboxpool.Sandbox, error) {
	if g.armed.CompareAndSwap(true, false) {
		close(g.listing)
		<-g.proceed
	}
	return g.Provider.List(ctx, md)
}

// A sandbox created for the pair while a Remove ran is found and killed by
// that Remove, and is not left in the pool to be handed out after it.
func TestRemoveForgetsASandboxCreatedWhileItRan(t *testing.T) {
	gate := &listGate{listing: make(chan struct{}), proceed: make(chan struct{})}
	e := newEnv(t, func(cfg *sandboxpool.Config) {
		gate.Provider = cfg.Provider.(*fp.Provider)
		cfg.Provider = gate
	})
	e.acquire(t, "u", "p").Release()
	require.Len(t, e.p.Alive(), 1)

	gate.armed.Store(true)
	done := make(chan error, 1)
	go func() { done <- e.m.Remove(context.Background(), "u", "p") }()
	<-gate.listing // the first sandbox is killed; Remove is about to list
	during := e.acquire(t, "u", "p")
	created := during.Sandbox().ID
	during.Release()
	close(gate.proceed)
	require.NoError(t, <-done)

	assert.Contains(t, e.p.Killed(), created, "Remove found it by metadata")
	after := e.acquire(t, "u", "p")
	defer after.Release()
	assert.NotEqual(t, created, after.Sandbox().ID, "not handed out after Remove")
	assert.NotContains(t, e.p.Killed(), after.Sandbox().ID)
}

// A deployment whose Redis user may not publish or subscribe still removes:
// the announcement fails (logged), Remove succeeds, and the refusals, being
// Redis's answers, never open the breaker.
func TestRedisRemoveWithoutPubSubPermission(t *testing.T) {
	srv := redistest.Start(t)
	admin := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: srv.Addr})
	defer admin.Close()
	require.NoError(t, admin.Do(context.Background(), "ACL", "SETUSER", "pool", "on", ">secret", "~*", "&*", "+@all", "-publish", "-subscribe").Err())
	c := newCluster(t, nil, srv.Addr)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: srv.Addr, Username: "pool", Password: "secret", MaxRetries: -1})
	defer rdb.Close()
	var logs syncBuffer
	m := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Redis = rdb
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "cannot subscribe") }, 5*time.Second, 5*time.Millisecond,
		"a refused subscription is reported, and given up")
	for i := range 5 {
		project := fmt.Sprint("p", i)
		id := acquireID(t, m, "u", project)
		require.NoError(t, m.Remove(context.Background(), "u", project))
		assert.Contains(t, c.p.Killed(), id)
	}
	st := m.Stats()
	assert.False(t, st.RedisDegraded, "refused commands are answers, not an outage")
	assert.EqualValues(t, 0, st.DegradedCreates)
	assert.Equal(t, 1, strings.Count(logs.String(), "cannot subscribe"))
	assert.Equal(t, 5, strings.Count(logs.String(), "announcing a removal to other instances failed"))
}

// A Manager closed before its background probe made a removal Redis did
// not answer makes it in Close, if Redis answers by then: the record does
// not outlive the removal, and the other instances forget the sandbox at
// once instead of at their next probe. If Redis still does not answer,
// Close returns all the same, and says what it could not announce.
func TestCloseMakesTheRemovalsRedisDidNotAnswer(t *testing.T) {
	var logs syncBuffer
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		sandboxpool.SlowRedisProbe(cfg, time.Hour) // no flush but Close's
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	other, m := c.instance(t), c.instance(t)
	id := acquireID(t, m, "u", "p")
	require.Equal(t, id, acquireID(t, other, "u", "p"))
	c.waitSubscribers(t, 2)
	removeUnanswered := func(project string) {
		t.Helper()
		c.mr.Close()
		require.ErrorIs(t, m.Remove(context.Background(), "u", project), sandboxpool.ErrUnavailable)
		require.NoError(t, c.mr.Restart())
	}

	removeUnanswered("p")
	require.EqualValues(t, 1, m.Stats().UnannouncedRemovals)
	require.Eventually(t, func() bool { return other.Stats().Resubscribed == 1 }, 5*time.Second, 5*time.Millisecond)
	require.Equal(t, id, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "Redis did not answer the Remove")
	require.NoError(t, m.Close(context.Background()))
	assert.Zero(t, m.Stats().UnannouncedRemovals)
	assert.Empty(t, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the record outlived the removal")
	require.Eventually(t, func() bool { return other.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
		"the other instance was not told of the removal")
	assert.NotContains(t, logs.String(), "close: Redis did not answer")

	// Redis does not answer Close either: the removal is reported.
	m = c.instance(t)
	acquireID(t, m, "u", "q")
	removeUnanswered("q")
	c.mr.Close()
	require.NoError(t, m.Close(context.Background()))
	assert.EqualValues(t, 1, m.Stats().UnannouncedRemovals)
	assert.Contains(t, logs.String(), "close: Redis did not answer")
	assert.Contains(t, logs.String(), "unpublished=0 removals=1")
}

// Close waits for a Remove in flight, so that a removal Redis did not
// answer is in Close's last try; before, Close returned while the Remove
// ran, and the removal it kept afterwards was lost: the record named a
// killed sandbox until it expired. A Close whose ctx ends first cuts the
// Remove, which then says the Manager closed.
func TestCloseWaitsForARemoveInFlight(t *testing.T) {
	var logs syncBuffer
	var mr *miniredis.Miniredis
	var kills *endedKills
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		kills = &endedKills{Provider: cfg.Provider}
		sandboxpool.SlowRedisProbe(cfg, time.Hour) // no flush but Close's
		cfg.Provider = kills
		// Redis answers again as soon as the Remove has kept its removal:
		// it answers Close's last try. (At Debug: the line is, once an
		// earlier failure of the episode was the Warn.)
		cfg.Logger = slog.New(onMessage{slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}),
			"announcing a removal to other instances failed", func() { mr.SetError("") }})
	})
	mr = c.mr
	other, m := c.instance(t), c.instance(t)
	id := acquireID(t, m, "u", "p")
	require.Equal(t, id, acquireID(t, other, "u", "p"))
	c.waitSubscribers(t, 2)

	c.p.SetLatency(fp.OpKill, 200*time.Millisecond)
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	removed := make(chan error, 1)
	go func() { removed <- m.Remove(context.Background(), "u", "p") }()
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpKill) == 1 }, 5*time.Second, time.Millisecond)
	require.NoError(t, m.Close(context.Background()))
	require.EqualValues(t, 1, kills.n.Load(), "Close returned before the Remove in flight")
	require.ErrorIs(t, <-removed, sandboxpool.ErrUnavailable, "Redis did not answer the Remove")
	assert.Zero(t, m.Stats().UnannouncedRemovals)
	assert.Empty(t, c.hget(t, "sandboxpool:{u:p}:sbx", "id"), "the record outlived the removal")
	assert.Empty(t, c.p.Alive())
	require.Eventually(t, func() bool { return other.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
		"the other instance was not told of the removal")
	assert.NotContains(t, logs.String(), "close: Redis did not answer")
}

// Close stops every goroutine the Manager started (its removal subscriber,
// reaper, probe and clock loops, its kept workers) while the Redis client
// stays open: Config.Redis is the caller's, and a service that closes a
// Manager and keeps the client, or builds the next Manager on it, must not
// be left with the closed one's goroutines, or with work of it that ends
// only when the client closes. A kept worker would leave by itself a
// second later (workerIdle), after goleak has stopped looking.
func TestCloseLeavesNoGoroutineWhileTheRedisClientStaysOpen(t *testing.T) {
	onBoth(t, func(t *testing.T, newCluster func(*testing.T, ...func(*sandboxpool.Config)) *cluster) {
		c := newCluster(t)
		rdb := c.client(t)
		require.NoError(t, rdb.Ping(context.Background()).Err()) // the client's own connection predates the baseline
		baseline := goleak.IgnoreCurrent()
		m, err := sandboxpool.New(sandboxpool.Config{Provider: fp.New(), Redis: rdb}) // real clock, reaper and loops
		require.NoError(t, err)
		c.waitSubscribers(t, 1)
		acquireID(t, m, "u", "p")
		require.NoError(t, m.Remove(context.Background(), "u", "p")) // a removal announced
		acquireID(t, m, "u", "q")                                    // a fill on a worker, kept after it
		require.NoError(t, m.Close(context.Background()))
		goleak.VerifyNone(t, baseline,
			// miniredis serves the client's pooled connections in this process
			goleak.IgnoreAnyFunction("github.com/alicebob/miniredis/v2/server.(*Server).servePeer"),
			goleak.IgnoreAnyFunction("github.com/alicebob/miniredis/v2/server.(*Server).servePeer.func2"))
		require.Eventually(t, func() bool { // and the subscription's connection is closed
			got, err := c.rdb.PubSubNumSub(context.Background(), "sandboxpool:removed").Result()
			return err == nil && got["sandboxpool:removed"] == 0
		}, 5*time.Second, 5*time.Millisecond, "the removal subscription outlived Close")
		require.NoError(t, rdb.Ping(context.Background()).Err(), "the caller's client outlives the Manager")
	})
}

// onMessage is a slog.Handler that calls fn before it handles a record
// whose message contains msg: a test's hook on a moment only a log marks.
type onMessage struct {
	slog.Handler
	msg string
	fn  func()
}

func (h onMessage) Handle(ctx context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.msg) {
		h.fn()
	}
	return h.Handler.Handle(ctx, r)
}

// A Manager closed before its background probe published the sandboxes it
// created while Redis was down publishes them in Close, if Redis answers
// by then: another instance reuses such a sandbox (and what the user left
// in it) instead of creating a new one. Before, it was left running,
// known to no one, until its provider deadline.
func TestClosePublishesTheSandboxesCreatedWhileRedisWasDown(t *testing.T) {
	var logs syncBuffer
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		sandboxpool.SlowRedisProbe(cfg, time.Hour) // no publication but Close's
		cfg.MaxSandboxes = 10                      // quota places kept in Redis
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	a, b := c.instance(t), c.instance(t)
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	cold := acquireID(t, a, "u", "cold")
	require.EqualValues(t, 1, a.Stats().DegradedCreates)
	c.mr.SetError("")
	require.Empty(t, c.hget(t, "sandboxpool:{u:cold}:sbx", "id"), "not published before Close")
	require.EqualValues(t, 1, a.Stats().UnpublishedSandboxes)

	require.NoError(t, a.Close(context.Background()))
	assert.Zero(t, a.Stats().UnpublishedSandboxes)
	assert.Equal(t, cold, c.hget(t, "sandboxpool:{u:cold}:sbx", "id"))
	places, err := c.rdb.ZRange(context.Background(), "sandboxpool:live", 0, -1).Result()
	require.NoError(t, err)
	assert.Contains(t, places, "u:cold", "with its quota place")
	assert.Equal(t, cold, acquireID(t, b, "u", "cold"), "another instance reuses it")
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	assert.NotContains(t, logs.String(), "close: Redis did not answer")

	// Redis does not answer Close either: the sandbox is reported.
	a = c.instance(t)
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	acquireID(t, a, "u", "colder")
	c.mr.Close()
	require.NoError(t, a.Close(context.Background()))
	assert.Contains(t, logs.String(), "unpublished=1 removals=0")
}

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Against a Redis that never answers, each call gives up at RedisTimeout,
// not at the client's socket timeout (10 s here): an Acquire degrades to a
// create without the lock within a few RedisTimeouts, the create lock's
// attempts included, and Close does not wait on the removal subscriber's
// handshake either.
func TestRedisTimeoutBoundsCallsToAStalledRedis(t *testing.T) {
	srv := redistest.Start(t)
	srv.Pause() // accepts connections, answers nothing; killed at test end
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: srv.Addr, MaxRetries: -1,
		ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second})
	defer rdb.Close()
	m, err := sandboxpool.New(sandboxpool.Config{Provider: fp.New(), Redis: rdb, RedisTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	l, err := m.Acquire(ctx, "u", "p")
	elapsed := time.Since(start)
	require.NoError(t, err)
	l.Release()
	assert.Less(t, elapsed, 5*time.Second, "a Redis call outlived RedisTimeout")
	st := m.Stats()
	assert.EqualValues(t, 1, st.DegradedCreates)
	assert.Positive(t, st.RedisErrors)

	start = time.Now()
	require.NoError(t, m.Close(ctx))
	assert.Less(t, time.Since(start), 5*time.Second, "Close waited on a stalled Redis")
}

// faultHook decides the fate of the calls of one client whose arguments
// name key: fate gets them in order, numbered from 1 (a script's NOSCRIPT
// round, which go-redis follows with the script itself, is not counted).
type faultHook struct {
	passHook
	key  string
	mu   sync.Mutex
	seen int
	fate func(n int, cmd redis.Cmder) fate
}

type fate int

const (
	pass  fate = iota
	fail       // never sent
	lose       // reaches Redis; its reply does not come back
	empty      // answered as an empty hash (a miss), without Redis
)

var errInjected = errors.New("i/o timeout (injected)")

func (h *faultHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !slices.Contains(cmd.Args(), any(h.key)) {
			return next(ctx, cmd)
		}
		h.mu.Lock()
		h.seen++
		f := h.fate(h.seen, cmd)
		h.mu.Unlock()
		switch f {
		case fail:
			cmd.SetErr(errInjected)
			return errInjected
		case empty:
			cmd.(*redis.MapStringStringCmd).SetVal(map[string]string{})
			return nil
		}
		err := next(ctx, cmd)
		switch {
		case err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT"):
			h.mu.Lock()
			h.seen--
			h.mu.Unlock()
		case f == lose:
			cmd.SetErr(errInjected)
			return errInjected
		}
		return err
	}
}

// An instance that finds the pair's record within a moment of MaxAge does
// not reconnect to it (it would be retired at once, and never handed out
// again): it deletes the record and makes the pair a new sandbox, while the
// instance that leases the old one keeps its lease.
func TestRedisRecordAtMaxAgeIsNotReconnected(t *testing.T) {
	const sbxKey = "sandboxpool:{u:p}:sbx"
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	l, err := a.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	defer l.Release()
	old := l.Sandbox().ID
	for range 29 { // 14 min 30 s, the lease's keepalives keeping the record
		c.advance(30 * time.Second)
		a.ReapNow()
	}
	c.advance(29 * time.Second) // a second short of MaxAge
	require.Equal(t, old, c.mr.HGet(sbxKey, "id"))

	fresh := acquireID(t, b, "u", "p")
	assert.NotEqual(t, old, fresh, "handed out a sandbox a second from MaxAge")
	assert.Zero(t, b.Stats().Reconnects)
	assert.Equal(t, fresh, c.mr.HGet(sbxKey, "id"))
	assert.Contains(t, c.p.Alive(), old, "the lease on the old one was cut")
}

// A create whose publish Redis fails (after the sandbox was made) keeps the
// sandbox and hands it out: killing it would only make the caller wait for
// another. It is published once Redis answers the background probe, and
// another instance then reuses it.
func TestRedisPublishFailingAfterTheCreateKeepsTheSandboxAndPublishesItLater(t *testing.T) {
	const sbxKey = "sandboxpool:{u:p}:sbx"
	cl := newMiniCluster(t)
	var failed atomic.Bool
	hook := &faultHook{key: sbxKey, fate: func(_ int, cmd redis.Cmder) fate {
		if n := cmd.Name(); (n == "evalsha" || n == "eval") && failed.CompareAndSwap(false, true) {
			return fail // the first script on the record: the publish
		}
		return pass
	}}
	m := cl.instance(t, func(cfg *sandboxpool.Config) { cfg.Redis = cl.client(t, hook) })
	id := acquireID(t, m, "u", "p")
	require.True(t, failed.Load(), "no publish was failed")
	assert.Equal(t, []string{id}, cl.p.Alive(), "the sandbox made is kept")
	assert.EqualValues(t, 0, m.Stats().DegradedCreates, "made under the lock")

	require.Eventually(t, func() bool { return cl.mr.HGet(sbxKey, "id") == id }, 5*time.Second, 5*time.Millisecond,
		"never published once Redis answered")
	assert.Equal(t, id, acquireID(t, cl.instance(t), "u", "p"), "another instance reuses it")
	assert.EqualValues(t, 1, cl.p.Calls(fp.OpCreate))
}

// A Redis call on the create path that fails while Redis answers the
// others is no outage: the create is tried again under the lock, never
// made without it. Before, one such failure made the pair a sandbox
// without the lock (counted as a degraded create), and a failed read of
// the record under the lock counted as a miss: the pair got a second
// sandbox, published over the first. A lock whose grant reached Redis but
// whose reply was lost is the create's own to take again (not waited out
// for LockTTL), and CreateLimit charges the create once.
func TestRedisFailuresAmongAnswersKeepCreatesCoordinated(t *testing.T) {
	const sbxKey, lockKey = "sandboxpool:{u:p}:sbx", "sandboxpool:{u:p}:lock"
	for name, c := range map[string]struct {
		key       string
		published bool // another instance has published a sandbox for the pair
		fates     []fate
	}{
		"lock grant's reply lost":   {key: lockKey, fates: []fate{lose}},
		"lock call fails twice":     {key: lockKey, fates: []fate{fail, fail}},
		"read under the lock fails": {key: sbxKey, published: true, fates: []fate{empty, fail}}, // the first read, before the lock, found nothing yet
	} {
		t.Run(name, func(t *testing.T) {
			cl := newMiniCluster(t, func(cfg *sandboxpool.Config) {
				cfg.LockTTL = time.Hour // a lock left to expire would outlast the test
				cfg.CreateLimit = sandboxpool.RateLimit{Rate: 1, Per: time.Hour}
			})
			hook := &faultHook{key: c.key, fate: func(n int, _ redis.Cmder) fate {
				if n <= len(c.fates) {
					return c.fates[n-1]
				}
				return pass
			}}
			m := cl.instance(t, func(cfg *sandboxpool.Config) { cfg.Redis = cl.client(t, hook) })
			want := ""
			if c.published { // made elsewhere, under other metadata: no listing finds it
				sb, err := cl.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: 5 * time.Minute})
				require.NoError(t, err)
				cl.publish(t, "u", "p", sb.ID)
				want = sb.ID
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l, err := m.Acquire(ctx, "u", "p")
			require.NoError(t, err)
			got := l.Sandbox().ID
			l.Release()

			st := m.Stats()
			assert.EqualValues(t, 0, st.DegradedCreates, "created without the lock")
			assert.False(t, st.RedisDegraded)
			assert.Positive(t, st.RedisErrors, "the injected failures are counted")
			assert.Len(t, cl.p.Alive(), 1, "one sandbox for the pair")
			if want == "" {
				want = cl.p.Alive()[0]
			}
			assert.Equal(t, want, got)
			assert.Equal(t, want, cl.hget(t, sbxKey, "id"), "the pair's record names it")
			assert.NotContains(t, cl.keys(t), lockKey, "the lock is let go")
		})
	}
}

// A creator whose lock expired, and whose read of the record then failed,
// kills nothing: its new holder may have found the creator's sandbox by
// metadata and published it. The create tries again, under the lock, and
// hands that sandbox out. (Before, it killed the pair's published
// sandbox, and made another.)
func TestRedisLostLockWithAFailedReadKillsNothing(t *testing.T) {
	c := newMiniCluster(t)
	gate := &gatedCreate{Provider: c.p, created: make(chan string, 2), proceed: make(chan struct{})}
	published := false
	hook := &faultHook{key: "sandboxpool:{u:p}:sbx", fate: func(_ int, cmd redis.Cmder) fate {
		switch name := cmd.Name(); {
		case name == "evalsha" || name == "eval":
			published = true // our publish, refused: the lock is not ours
		case name == "hgetall" && published:
			published = false
			return fail // the read that follows it
		}
		return pass
	}}
	m := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Provider, cfg.Redis = gate, c.client(t, hook) })
	done := acquireAsync(m, "u", "p")
	ours := <-gate.created
	c.stealLock(t, "u", "p")
	c.publish(t, "u", "p", ours) // the new holder found ours by metadata
	c.expireLock(t, "u", "p")    // and let the lock go
	close(gate.proceed)

	r := result(t, done)
	require.NoError(t, r.err)
	assert.Equal(t, ours, r.id)
	assert.EqualValues(t, 0, c.p.Calls(fp.OpKill), "the pair's published sandbox was killed")
	assert.Equal(t, []string{ours}, c.p.Alive())
	assert.Equal(t, ours, c.hget(t, "sandboxpool:{u:p}:sbx", "id"))
	assert.EqualValues(t, 0, m.Stats().DegradedCreates)
}

// failPipelines fails a client's pipelines of HGETs while on, as a Redis
// that fails one read among answered calls would. (go-redis sends a new
// connection's handshake as a pipeline too: that one passes.)
type failPipelines struct {
	passHook
	on atomic.Bool
}

func (h *failPipelines) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if h.on.Load() && cmds[0].Name() == "hget" {
			for _, c := range cmds {
				c.SetErr(errInjected)
			}
			return errInjected
		}
		return next(ctx, cmds)
	}
}

// A resubscription that Redis refuses is made again. go-redis redials a
// subscription whose connection died and sends SUBSCRIBE again; when Redis
// refuses it (here BUSY, as while a script runs), the new connection
// answers pings but is subscribed to nothing. Before, the subscriber took
// it for healthy, and this instance never heard another removal until it
// restarted: it handed out sandboxes removed elsewhere until their probes.
//
// A refusal for good (an ACL without SUBSCRIBE) is given up, as at the
// start, rather than tried on a new connection ten times a second.
func TestRedisRefusedResubscriptionIsMadeAgain(t *testing.T) {
	var logs syncBuffer
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	a, b, id := c.sharing(t)
	c.waitSubscribers(t, 2)
	refuseSubscribes(t, c, "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", false)

	c.waitSubscribers(t, 2)
	require.NoError(t, b.Remove(context.Background(), "u", "p"))
	require.Eventually(t, func() bool { return a.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
		"the removal of %s did not reach the other instance", id)

	refused := refuseSubscribes(t, c, "NOPERM User has no permissions to run the 'subscribe' command", true)
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "cannot subscribe") == 2 }, 5*time.Second, time.Millisecond,
		"the subscribers did not give up")
	before := refused()
	assert.Never(t, func() bool { return refused() != before }, 500*time.Millisecond, 10*time.Millisecond,
		"a refusal for good was tried again") // five times each, were it retried
}

// refuseSubscribes restarts c's miniredis refusing every command with msg.
// Unless forGood, once two SUBSCRIBE commands (the instances'
// resubscriptions) have been refused, it lets every command through;
// forGood, it lets every command but SUBSCRIBE through at once. It returns
// how many SUBSCRIBE commands its hook has refused (those refused between
// the restart and the hook's installation are not counted).
func refuseSubscribes(t *testing.T, c *cluster, msg string, forGood bool) (refused func() int64) {
	t.Helper()
	c.mr.Close()
	c.mr.SetError(msg) // from the restart on
	require.NoError(t, c.mr.Restart())
	var n atomic.Int64
	var all atomic.Bool
	all.Store(true)
	c.mr.Server().SetPreHook(func(p *server.Peer, cmd string, _ ...string) bool {
		sub := strings.EqualFold(cmd, "subscribe")
		if sub {
			n.Add(1)
		}
		if all.Load() || sub && forGood {
			p.WriteError(msg)
			return true
		}
		return false
	})
	if !forGood {
		require.Eventually(t, func() bool { return n.Load() >= 2 }, 5*time.Second, time.Millisecond,
			"the subscribers did not subscribe again")
	}
	all.Store(false)
	return n.Load
}

// When Redis confirms the removal subscription again (here after a restart
// that kept its data), the pool is compared with Redis: a sandbox whose
// record still names it is not probed. Where Redis fails that read, the
// pooled sandboxes are rechecked: the pair's next Acquire probes.
func TestRedisResubscriptionRechecksWhatRedisCannotVouchFor(t *testing.T) {
	c := newMiniCluster(t)
	fault := &failPipelines{}
	m := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Redis = c.client(t, fault) })
	id := acquireID(t, m, "u", "p")
	c.waitSubscribers(t, 1)
	restart := func(n int64) {
		c.mr.Close()
		require.NoError(t, c.mr.Restart())
		require.Eventually(t, func() bool { return m.Stats().Resubscribed == n }, 5*time.Second, 5*time.Millisecond, "subscribed again: %+v", m.Stats())
	}

	probes := m.Stats().HealthChecks
	restart(1)
	require.Never(t, func() bool {
		return servedID(m, "u", "p") != id || m.Stats().HealthChecks != probes
	}, 300*time.Millisecond, 10*time.Millisecond, "a sandbox Redis still names was probed")

	fault.on.Store(true)
	restart(2)
	require.Eventually(t, func() bool {
		return servedID(m, "u", "p") == id && m.Stats().HealthChecks > probes
	}, 5*time.Second, 10*time.Millisecond, "a sandbox Redis could not vouch for was handed out unprobed")
}

// In a Redis outage, a sandbox's failing Redis call is logged at Debug
// once the breaker is open: the breaker's change of state is the warning.
// Before, every keepalive of every sandbox in use logged one, a line per
// sandbox per keepalive for as long as the outage lasted.
func TestRedisOutageWarnsOnceNotPerSandbox(t *testing.T) {
	var logs syncBuffer
	c := newMiniCluster(t)
	m := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	const inUse = 20
	for i := range inUse {
		l, err := m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.NoError(t, err)
		defer l.Release() // held: the reaper keeps them alive
	}
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	for i := 0; !m.Stats().RedisDegraded; i++ {
		require.Less(t, i, 20, "the breaker did not open")
		acquireID(t, m, "v", fmt.Sprint("q", i)) // created without the lock
	}
	require.Contains(t, logs.String(), "Redis circuit breaker", "the outage is announced")

	touches := m.Stats().Touches
	c.advance(4 * time.Minute) // past the keepalive lead of IdleTimeout (5 min)
	m.ReapNow()
	assert.GreaterOrEqual(t, m.Stats().Touches-touches, int64(inUse), "every sandbox in use was kept alive")
	assert.Zero(t, strings.Count(logs.String(), "extending Redis deadline failed"), "a warning per sandbox")

	// The breaker's tries while Redis still fails (open → half-open →
	// open, every cooldown) and its closing are no warnings.
	time.Sleep(100 * time.Millisecond) // several cooldowns of 20 ms
	m.ReapNow()
	c.mr.SetError("")
	require.Eventually(t, func() bool { acquireID(t, m, "w", "r"); return !m.Stats().RedisDegraded }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, 1, strings.Count(logs.String(), `level=WARN msg="sandboxpool: Redis circuit breaker"`), "one warning for the outage: %s", logs.String())
}

// Before the breaker opens (RedisTimeout of silence), a Redis that fails
// every call failed each sandbox's keepalive with a warning of its own:
// 22 of them in the soak's 1-second Redis restart. The first failure since
// a call succeeded is the warning; the success that ends the run says at
// Info how many were kept at Debug; the next failure is news again.
func TestRedisFailuresBeforeTheBreakerOpensWarnOnce(t *testing.T) {
	var logs syncBuffer
	c := newMiniCluster(t)
	m := c.instance(t, func(cfg *sandboxpool.Config) {
		cfg.RedisTimeout = time.Hour // the breaker stays closed
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	const inUse = 20
	for i := range inUse {
		l, err := m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.NoError(t, err)
		defer l.Release()
	}
	failed := func() int {
		return strings.Count(logs.String(), `level=WARN msg="sandboxpool: extending Redis deadline failed"`)
	}
	again := func() int { return strings.Count(logs.String(), `level=INFO msg="sandboxpool: Redis answers again"`) }
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	c.advance(4 * time.Minute) // past the keepalive lead of IdleTimeout (5 min)
	m.ReapNow()
	require.False(t, m.Stats().RedisDegraded)
	require.GreaterOrEqual(t, m.Stats().RedisErrors, int64(inUse), "every keepalive met the failure")
	assert.Equal(t, 1, failed(), "one warning, not one per sandbox")
	assert.Zero(t, again())

	c.mr.SetError("")
	acquireID(t, m, "v", "q")
	assert.Equal(t, 1, again())
	assert.Contains(t, logs.String(), fmt.Sprintf(`msg="sandboxpool: Redis answers again" failures_logged_at_debug=%d`, inUse-1))

	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	c.advance(4 * time.Minute)
	m.ReapNow()
	assert.Equal(t, 2, failed(), "a failure after a success is news")
}

// requestKey is a context key a caller's request carries (a trace span, a
// request id).
type requestKey struct{}

// valueHook records the requestKey value of each Redis call whose
// arguments name key.
type valueHook struct {
	passHook
	key  string
	mu   sync.Mutex
	seen []any
}

func (h *valueHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if slices.ContainsFunc(cmd.Args(), func(a any) bool { s, ok := a.(string); return ok && strings.Contains(s, h.key) }) {
			h.mu.Lock()
			h.seen = append(h.seen, ctx.Value(requestKey{}))
			h.mu.Unlock()
		}
		return next(ctx, cmd)
	}
}

// valueProvider records the requestKey value of each Create and Connect.
type valueProvider struct {
	*fp.Provider
	mu   sync.Mutex
	seen []any
}

func (p *valueProvider) record(ctx context.Context) {
	p.mu.Lock()
	p.seen = append(p.seen, ctx.Value(requestKey{}))
	p.mu.Unlock()
}

func (p *valueProvider) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	p.record(ctx)
	return p.Provider.Create(ctx, req)
}

func (p *valueProvider) Connect(ctx context.Context, id string, timeout time.Duration) (sandboxpool.Sandbox, error) {
	p.record(ctx)
	return p.Provider.Connect(ctx, id, timeout)
}

// A fill runs with the values of the ctx of the Acquire that started it,
// so that a tracer or a log handler sees its Redis and provider calls as
// that request's work, as puddle hands its constructor the acquiring
// context's values; its cancellation stays its own: the caller leaving
// does not cut the create. Before, the fill ran on the Manager's context
// alone, and its calls belonged to no request.
func TestFillCarriesTheCallersValuesNotItsCancellation(t *testing.T) {
	c := newMiniCluster(t)
	p := &valueProvider{Provider: c.p}
	hook := &valueHook{key: "{u:p}"}
	a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Provider = p; cfg.Redis = c.client(t, hook) })

	c.p.SetLatency(fp.OpCreate, 200*time.Millisecond)
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), requestKey{}, "request 1"))
	defer cancel()
	left := make(chan error, 1)
	go func() { _, err := a.Acquire(ctx, "u", "p"); left <- err }()
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	require.ErrorIs(t, <-left, context.Canceled, "the caller left during the create")
	c.p.SetLatency(fp.OpCreate, 0)
	l, err := a.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	l.Release()
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate), "the create went on without its caller, and was kept")
	assert.Equal(t, []any{"request 1"}, p.seen)
	hook.mu.Lock()
	assert.NotEmpty(t, hook.seen)
	for _, v := range hook.seen {
		assert.Equal(t, "request 1", v, "every Redis call of the fill carries the request's values: %v", hook.seen)
	}
	hook.mu.Unlock()

	// Another instance's warm path: the record found, the sandbox connected
	// to, with the request's values.
	p2 := &valueProvider{Provider: c.p}
	b := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Provider = p2 })
	l, err = b.Acquire(context.WithValue(context.Background(), requestKey{}, "request 2"), "u", "p")
	require.NoError(t, err)
	l.Release()
	assert.Equal(t, sandboxpool.OutcomeCacheHit, l.Outcome())
	assert.Equal(t, []any{"request 2"}, p2.seen)
}
