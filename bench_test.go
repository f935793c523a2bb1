package sandboxpool_test

// Benchmarks. Each figure is meant to be read as a ratio to a baseline
// measured in the same run (make bench prints the table):
//
//	BenchmarkHotPath/*        Acquire+Release on a memory hit vs a bare 64-shard
//	                          maphash map + atomic store, puddle/v2, and the old
//	                          single-mutex design that read Redis every request;
//	                          pairs visited in random order
//	BenchmarkHotPathIndexOrder/* the same (without the Redis-backed variants),
//	                          pairs visited in creation order
//	BenchmarkHotPathCacheResident/* the same over 4,096 pairs, a pool that
//	                          stays in cache, in random order
//	BenchmarkHotPathArrivalIDs/* the same random order over 100k pairs, each
//	                          request's ids read from a stream laid out in
//	                          arrival order instead of from tables by pair
//	BenchmarkRedisPaths/*     warm (Redis hit) and cold (create) paths: Redis
//	                          round trips per call (go-redis hook) and latency
//	                          vs one plain GET on the same client; the warm
//	                          path also through the E2B provider against the
//	                          fake E2B, vs a GET followed by one Connect to it;
//	                          the warm path's time split into its I/O and the
//	                          pool's own time
//	BenchmarkContention/*     1,000 goroutines on one pair; 8 managers on 100 pairs
//	BenchmarkMemoryPerPair    bytes per pooled pair at 1,000,000 pairs, and after churn
//	BenchmarkReaperTickIdle   one reaper tick with 1,000,000 live pairs, nothing due

import (
	"context"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/jackc/puddle/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

var benchPairs = envInt("SANDBOXPOOL_BENCH_PAIRS", 100_000)

var benchUsers, benchProjects = func() ([]string, []string) {
	u, p := make([]string, benchPairs), make([]string, benchPairs)
	for i := range u {
		u[i], p[i] = "user"+strconv.Itoa(i), "proj"+strconv.Itoa(i%97)
	}
	return u, p
}()

// reqUsers and reqProjects are the ids as requests carry them: equal to the
// pairs' ids, but strings of their own, as a handler's parsed ids are. The
// hot-path contenders look pairs up with them, so none of them compares an
// id with the very string it stored: the pool keeps its own copy of every
// pair's ids, and a map filled with benchUsers would otherwise match by
// pointer, without reading a byte.
var reqUsers, reqProjects = cloneIDs(indexOrder)

// cloneIDs returns copies of the ids of the pairs in order, one string each,
// allocated in that order.
func cloneIDs(order []int) (users, projects []string) {
	users, projects = make([]string, len(order)), make([]string, len(order))
	for j, i := range order {
		users[j], projects[j] = strings.Clone(benchUsers[i]), strings.Clone(benchProjects[i])
	}
	return users, projects
}

// nullProvider creates sandboxes that cost nothing to keep: the benchmarks
// measure the pool, not a fake's bookkeeping.
type nullProvider struct{ n atomic.Int64 }

func (p *nullProvider) Create(context.Context, sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	return sandboxpool.Sandbox{ID: "i" + strconv.FormatInt(p.n.Add(1), 36), Domain: "e2b.app"}, nil
}
func (p *nullProvider) Connect(_ context.Context, id string, _ time.Duration) (sandboxpool.Sandbox, error) {
	return sandboxpool.Sandbox{ID: id, Domain: "e2b.app"}, nil
}
func (*nullProvider) Check(context.Context, sandboxpool.Sandbox) error        { return nil }
func (*nullProvider) SetTimeout(context.Context, string, time.Duration) error { return nil }
func (*nullProvider) Kill(context.Context, string) error                      { return nil }
func (*nullProvider) List(context.Context, map[string]string) ([]sandboxpool.Sandbox, error) {
	return nil, nil
}

// The benchmark managers' deadlines, which the warm path's references
// reproduce.
const (
	benchCreateTimeout = time.Minute
	benchRedisTimeout  = 5 * time.Second
)

func newBenchManager(p sandboxpool.Provider, rdb redis.UniversalClient) *sandboxpool.Manager {
	m, err := sandboxpool.New(sandboxpool.Config{Provider: p, Redis: rdb, IdleTimeout: time.Hour, MaxAge: 2 * time.Hour,
		HealthCheckAfter: time.Hour, CreateTimeout: benchCreateTimeout, RedisTimeout: benchRedisTimeout})
	if err != nil {
		panic(err)
	}
	return m
}

func benchManager(b *testing.B, p sandboxpool.Provider, rdb redis.UniversalClient) *sandboxpool.Manager {
	m := newBenchManager(p, rdb)
	b.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

// filledManager is a Manager holding n pooled pairs, built once.
func filledManager(key string, n int, rdb func() (redis.UniversalClient, func())) *sandboxpool.Manager {
	return fixture(key, func() (*sandboxpool.Manager, func()) {
		var client redis.UniversalClient
		closeRedis := func() {}
		if rdb != nil {
			client, closeRedis = rdb()
		}
		m := newBenchManager(&nullProvider{}, client)
		fill(nil, m, n)
		runtime.GC() // measure the pool, not the collection of its fill's garbage
		return m, func() { _ = m.Close(context.Background()); closeRedis() }
	})
}

// fill acquires pairs [0,n) once, in parallel.
func fill(b *testing.B, m *sandboxpool.Manager, n int) {
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				l, err := m.Acquire(context.Background(), benchUsers[i%benchPairs]+pairSuffix(i), benchProjects[i%benchPairs])
				if err != nil {
					panic(err)
				}
				l.Release()
			}
		})
	}
	wg.Wait()
}

func pairSuffix(i int) string {
	if i < benchPairs {
		return ""
	}
	return "-" + strconv.Itoa(i/benchPairs)
}

// baseline is the floor of any pool lookup: a 64-shard map keyed by the two
// strings, hashed with maphash, read-locked, plus one atomic store.
type baseline struct {
	seed   maphash.Seed
	shards [64]struct {
		mu sync.RWMutex
		m  map[[2]string]*atomic.Int64
		_  [40]byte
	}
}

// newBaseline holds pairs [0,n), each value a record of the given number of
// 8-byte words (the store goes to the first).
func newBaseline(n, words int) *baseline {
	bl := &baseline{seed: maphash.MakeSeed()}
	for i := range bl.shards {
		bl.shards[i].m = map[[2]string]*atomic.Int64{}
	}
	for i := range n {
		sh := &bl.shards[bl.hash(benchUsers[i], benchProjects[i])&63]
		sh.m[[2]string{benchUsers[i], benchProjects[i]}] = &make([]atomic.Int64, words)[0]
	}
	return bl
}

// recordWords is the size, in 8-byte words, of the records in the
// reference map: 128 bytes, the pool's slot (at most 128 bytes,
// TestSlotSize) without the ids it holds beside it, which is what a pair's
// sandbox takes to describe.
const recordWords = 16

func (bl *baseline) hash(u, p string) uint64 {
	return maphash.String(bl.seed, u)*31 ^ maphash.String(bl.seed, p)
}

func (bl *baseline) touch(u, p string, now int64) {
	sh := &bl.shards[bl.hash(u, p)&63]
	sh.mu.RLock()
	e := sh.m[[2]string{u, p}]
	sh.mu.RUnlock()
	e.Store(now)
}

// naiveManager is the old design: one global mutex, a joined string key,
// and a Redis read on every request.
type naiveManager struct {
	mu  sync.Mutex
	m   map[string]string
	rdb redis.UniversalClient
}

func (n *naiveManager) acquire(ctx context.Context, u, p string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	key := "sandboxpool:" + u + ":" + p
	id, _ := n.rdb.Get(ctx, key).Result()
	if id == "" {
		id = n.m[key]
	}
	return id
}

// Redis databases of the benchmarks on a shared redis-server: each fixture
// that outlives one benchmark run keeps its own, so a benchmark that starts
// from an empty database (and flushes it) never wipes a fixture's records.
const (
	dbScratch  = 0 // emptied by every benchmark that opens it
	dbHotRedis = 1 // the Redis-backed hot-path fixture
	dbWarm     = 2 // the records the warm-path benchmark reconnects to
	dbWarmE2B  = 3 // the same, for sandboxes at the fake E2B
)

// openRedis returns a client for database db of a real redis-server when
// SANDBOXPOOL_BENCH_REDIS names one (host:port; make bench starts one),
// emptied, else for an in-process miniredis, and a func that closes it.
func openRedis(db int) (redis.UniversalClient, func()) {
	if addr := os.Getenv("SANDBOXPOOL_BENCH_REDIS"); addr != "" {
		c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, DB: db, PoolSize: 64})
		_ = c.FlushDB(context.Background()).Err()
		return c, func() { _ = c.Close() }
	}
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	return c, func() { _ = c.Close(); mr.Close() }
}

// benchRedis opens the scratch database for one benchmark run.
func benchRedis(b *testing.B) redis.UniversalClient {
	c, closer := openRedis(dbScratch)
	b.Cleanup(closer)
	return c
}

// Orders the hot-path benchmarks visit pairs in. randomOrder is a fixed
// random permutation, as requests arrive: no figure owes anything to pairs
// that sit next to each other in memory being visited one after the other.
// indexOrder walks the pairs in the order they were created, which lets the
// baseline's 8-byte values (allocated in that order) share cache lines and
// lets the hardware prefetch: it flatters every contender's caches, the
// baseline's most. cacheOrder visits a pool small enough to stay in cache
// (see cachePairs) in random order.
var (
	randomOrder = rand.New(rand.NewPCG(1, 2)).Perm(benchPairs)
	cacheOrder  = rand.New(rand.NewPCG(3, 4)).Perm(cachePairs)
	indexOrder  = func() []int {
		order := make([]int, benchPairs)
		for i := range order {
			order[i] = i
		}
		return order
	}()
)

// requests are the ids requests carry, in the order a benchmark visits
// pairs. byPair reads them from reqUsers and reqProjects, indexed by pair:
// visited in random order, each request's ids sit at a random place in two
// 100k-entry tables, and reading them costs cache misses of their own, the
// same for every contender but puddle, which looks no pair up. inArrival
// lays a copy of them out in visiting order, as a server's freshly read
// requests arrive: the hardware streams them in, and a lookup pays mostly
// for reaching its pair.
type requests struct {
	users, projects []string
	pair            []int // users[pair[j]] is request j's; nil: users[j]
}

func byPair(order []int) requests { return requests{reqUsers, reqProjects, order} }

// len is the number of requests.
func (r requests) len() int {
	if r.pair != nil {
		return len(r.pair)
	}
	return len(r.users)
}

func inArrival(order []int) requests {
	return fixture(fmt.Sprintf("arrival-%p", order), func() (requests, func()) {
		var r requests
		r.users, r.projects = cloneIDs(order)
		return r, func() {}
	})
}

// parallelPairs runs body on every benchmark goroutine, each taking the
// requests in order from its own random start.
func parallelPairs(b *testing.B, reqs requests, body func(user, project string)) {
	b.RunParallel(func(pb *testing.PB) {
		n := reqs.len()
		j := rand.IntN(n)
		for pb.Next() {
			i := j
			if reqs.pair != nil {
				i = reqs.pair[j]
			}
			body(reqs.users[i], reqs.projects[i])
			if j++; j == n {
				j = 0
			}
		}
	})
}

// hotAcquireRelease measures Acquire+Release over the pooled pairs and fails
// unless every Acquire was a memory hit with no create or probe.
func hotAcquireRelease(b *testing.B, m *sandboxpool.Manager, reqs requests) {
	before := m.Stats()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	parallelPairs(b, reqs, func(user, project string) {
		l, err := m.Acquire(ctx, user, project)
		if err != nil {
			b.Error(err)
			return
		}
		l.Release()
	})
	b.StopTimer()
	st := m.Stats()
	if st.Creates != before.Creates || st.HealthChecks != before.HealthChecks || st.MemoryHits-before.MemoryHits != int64(b.N) {
		b.Fatalf("not a pure memory-hit run: %d memory hits of %d, %+v", st.MemoryHits-before.MemoryHits, b.N, st)
	}
}

// cachePairs is the pool of BenchmarkHotPathCacheResident: 4,096 pairs,
// whose slots (512 KiB) and index fit in one core's 1 MiB L2 here, so a
// lookup pays mostly for the pool's own work rather than for reaching
// memory.
const cachePairs = 4096

// BenchmarkHotPath visits the pairs in random order (see randomOrder).
func BenchmarkHotPath(b *testing.B) { hotPath(b, benchPairs, byPair(randomOrder), true) }

// BenchmarkHotPathIndexOrder is the same hot path in creation order (see
// indexOrder), without the Redis-backed and single-mutex variants.
func BenchmarkHotPathIndexOrder(b *testing.B) { hotPath(b, benchPairs, byPair(indexOrder), false) }

// BenchmarkHotPathCacheResident is the same hot path over a pool that stays
// in cache (see cachePairs), in random order.
func BenchmarkHotPathCacheResident(b *testing.B) { hotPath(b, cachePairs, byPair(cacheOrder), false) }

// BenchmarkHotPathArrivalIDs is BenchmarkHotPath's random order with the
// requests' ids laid out in arrival order (see requests), without the
// Redis-backed and single-mutex variants.
func BenchmarkHotPathArrivalIDs(b *testing.B) {
	hotPath(b, benchPairs, inArrival(randomOrder), false)
}

// hotPath runs the hot-path contenders over pairs [0,pairs), taking reqs in
// order.
func hotPath(b *testing.B, pairs int, reqs requests, all bool) {
	// The baseline, and the same map holding a record of a slot's size
	// per pair: a reference for what reaching a pair's record costs.
	for _, c := range []struct {
		name  string
		words int
	}{{"baseline-maphash64", 1}, {"ref-maphash64-128B-records", recordWords}} {
		b.Run(c.name, func(b *testing.B) {
			bl := fixture(c.name+"-"+strconv.Itoa(pairs), func() (*baseline, func()) { return newBaseline(pairs, c.words), func() {} }) // built once, as the pools are
			now := time.Now().UnixNano()
			b.ReportAllocs()
			b.ResetTimer()
			parallelPairs(b, reqs, func(user, project string) { bl.touch(user, project, now) })
		})
	}
	b.Run("sandboxpool-Acquire+Release", func(b *testing.B) {
		hotAcquireRelease(b, filledManager("hot-"+strconv.Itoa(pairs), pairs, nil), reqs)
	})
	b.Run("sandboxpool-Use", func(b *testing.B) {
		m := filledManager("hot-"+strconv.Itoa(pairs), pairs, nil)
		ctx := context.Background()
		use := func(sandboxpool.Sandbox) error { return nil }
		b.ReportAllocs()
		b.ResetTimer()
		parallelPairs(b, reqs, func(user, project string) {
			if err := m.Use(ctx, user, project, use); err != nil {
				b.Error(err)
			}
		})
	})
	b.Run("puddle-Acquire+Release", benchPuddle)
	if !all {
		return
	}
	b.Run("sandboxpool-with-redis-Acquire+Release", func(b *testing.B) {
		calls := fixture("hot-redis-calls", func() (*atomic.Int64, func()) { return new(atomic.Int64), func() {} })
		m := filledManager("hot-redis", benchPairs, func() (redis.UniversalClient, func()) {
			c, closer := openRedis(dbHotRedis)
			c.AddHook(countingHook{n: calls})
			return c, closer
		})
		calls.Store(0)
		hotAcquireRelease(b, m, reqs)
		b.ReportMetric(float64(calls.Load())/float64(b.N), "redis-rt/op")
	})
	b.Run("naive-global-mutex+redis-GET", func(b *testing.B) {
		rdb := benchRedis(b)
		n := &naiveManager{m: map[string]string{}, rdb: rdb}
		ctx := context.Background()
		b.ReportAllocs()
		b.ResetTimer()
		parallelPairs(b, reqs, func(user, project string) { n.acquire(ctx, user, project) })
	})
}

// benchPuddle is jackc/puddle/v2's Acquire+Release: a pool of identical
// resources, no key to look up.
func benchPuddle(b *testing.B) {
	pool, err := puddle.NewPool(&puddle.Config[int]{
		Constructor: func(context.Context) (int, error) { return 1, nil },
		Destructor:  func(int) {},
		MaxSize:     int32(4 * runtime.GOMAXPROCS(0)),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r, err := pool.Acquire(ctx)
			if err != nil {
				b.Error(err)
				return
			}
			r.Release()
		}
	})
}

// refWorker is a goroutine that runs the funcs sent to it, as the Manager's
// background workers run fills.
type refWorker chan func()

// countingHook counts Redis round trips: one per command, one per pipeline;
// with ns set, it also sums the time they took (see ioTimer).
//
// It leaves out the handshake go-redis runs on each connection it dials
// (HELLO, then a pipeline of SELECT, CLIENT and the like), which passes
// through the client's hooks too: it is the connection pool's cost, paid
// once per connection, not a call's. A benchmark run opens a fresh client,
// so counting it added one or two round trips per run, 5.001 per cold
// create instead of 5 in a run of 2,500 creates.
type countingHook struct {
	passHook
	n, ns *atomic.Int64
}

func (h countingHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if handshake(cmd) {
			return next(ctx, cmd)
		}
		return h.count(func() error { return next(ctx, cmd) })
	}
}
func (h countingHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return !handshake(c) }) {
			return next(ctx, cmds)
		}
		return h.count(func() error { return next(ctx, cmds) })
	}
}

// handshake reports whether cmd is no Acquire's: one go-redis sends to
// set up a new connection (the library itself sends none of these), or the
// INFO a Manager sends once, from New, to read Redis's eviction policy,
// which benchWarm, building Managers in its loop, would count as a share
// of each call's.
func handshake(cmd redis.Cmder) bool {
	switch cmd.Name() {
	case "hello", "auth", "select", "readonly", "client", "info":
		return true
	}
	return false
}

func (h countingHook) count(call func() error) error {
	h.n.Add(1)
	if h.ns == nil {
		return call()
	}
	start := time.Now()
	err := call()
	h.ns.Add(int64(time.Since(start)))
	return err
}

// ioTimer is a Provider whose Connects are timed into ns, as countingHook
// times Redis calls: together they split a warm Acquire into its I/O and
// the pool's own time.
type ioTimer struct {
	sandboxpool.Provider
	ns *atomic.Int64
}

func (p ioTimer) Connect(ctx context.Context, id string, timeout time.Duration) (sandboxpool.Sandbox, error) {
	start := time.Now()
	sb, err := p.Provider.Connect(ctx, id, timeout)
	p.ns.Add(int64(time.Since(start)))
	return sb, err
}

func BenchmarkRedisPaths(b *testing.B) {
	ctx := context.Background()
	// The baseline, and references that locate the warm path's cost:
	// reading a record (an HGETALL of the same shape); a GET handed to a new
	// goroutine and waited for, as a fill detached from its callers was
	// before fills ran on workers; and a GET handed to a waiting worker
	// under the two deadlines a fill runs with (CreateTimeout for the fill,
	// RedisTimeout for each call), as a fill is now.
	getK := func(ctx context.Context, rdb redis.UniversalClient) { _ = rdb.Get(ctx, "k").Err() }
	w := fixture("ref-worker", func() (refWorker, func()) {
		w := make(refWorker)
		go func() {
			for fn := range w {
				fn()
			}
		}()
		return w, func() { close(w) }
	})
	for _, c := range []struct {
		name string
		op   func(rdb redis.UniversalClient)
	}{
		{"baseline-GET", func(rdb redis.UniversalClient) { getK(ctx, rdb) }},
		{"ref-HGETALL", func(rdb redis.UniversalClient) { _ = rdb.HGetAll(ctx, "h").Err() }},
		{"ref-GET-on-new-goroutine", func(rdb redis.UniversalClient) {
			done := make(chan struct{})
			go func() { getK(ctx, rdb); close(done) }()
			<-done
		}},
		{"ref-GET-on-worker-with-deadlines", func(rdb redis.UniversalClient) {
			done := make(chan struct{})
			w <- func() {
				fillCtx, cancelFill := context.WithTimeout(ctx, benchCreateTimeout)
				callCtx, cancelCall := context.WithTimeout(fillCtx, benchRedisTimeout)
				getK(callCtx, rdb)
				cancelCall()
				cancelFill()
				close(done)
			}
			<-done
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			rdb := benchRedis(b)
			_ = rdb.Set(ctx, "k", "v", 0).Err()
			_ = rdb.HSet(ctx, "h", "id", "i0123456789abcdefghij", "tpl", "base", "created", "1800000000000", "deadline", "1800000300000").Err()
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				c.op(rdb)
			}
		})
	}
	b.Run("warm-redis-hit", func(b *testing.B) { benchWarm(b, "warm", dbWarm, 20_000, &nullProvider{}) })
	b.Run("cold-create", func(b *testing.B) {
		rdb := benchRedis(b)
		var calls atomic.Int64
		rdb.AddHook(countingHook{n: &calls})
		m := benchManager(b, &nullProvider{}, rdb)
		calls.Store(0)
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			l, err := m.Acquire(ctx, benchUsers[i%benchPairs]+pairSuffix(i), benchProjects[i%benchPairs])
			if err != nil {
				b.Fatal(err)
			}
			l.Release()
		}
		b.StopTimer()
		b.ReportMetric(float64(calls.Load())/float64(b.N), "redis-rt/op")
	})
	// The warm path against the fake E2B over HTTP through the E2B
	// provider, and the provider call it makes, alone and after a GET: the
	// issue's "GET plus the provider call", each measured in the same run.
	e2bFake := fixture("e2b-fake", func() (sandboxpool.Provider, func()) {
		srv := e2btest.Start(e2btest.Config{})
		client, err := e2b.New(srv.ClientOptions())
		if err != nil {
			panic(err)
		}
		return sandboxpool.NewE2BProvider(client), srv.Close
	})
	connect := func(b *testing.B, get func()) {
		sb, err := e2bFake.Create(ctx, sandboxpool.CreateRequest{Template: "base", Timeout: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			get()
			if _, err := e2bFake.Connect(ctx, sb.ID, time.Hour); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("ref-e2b-Connect", func(b *testing.B) { connect(b, func() {}) })
	// A GET and then a Connect, on the benchmark goroutine with no pool:
	// the warm path's own I/O, in its order. Here a Connect that follows a
	// wait on redis-server took about twice as long as one in a tight loop
	// of Connects (timed by wrapping the provider, in a side experiment),
	// so the warm budget counts the provider call as this reference makes
	// it.
	b.Run("ref-GET-then-e2b-Connect", func(b *testing.B) {
		rdb := benchRedis(b)
		_ = rdb.Set(ctx, "k", "v", 0).Err()
		connect(b, func() { getK(ctx, rdb) })
	})
	// 2,000 pairs: the owner creates them through the fake, whose listing
	// (an adoption check before each create) scans every sandbox.
	b.Run("warm-redis-hit-e2b-fake", func(b *testing.B) { benchWarm(b, "warm-e2b", dbWarmE2B, 2_000, e2bFake) })
}

// benchWarm measures Acquire+Release by fresh instances using provider p on
// pairs [0,n) that an owner instance created and Redis (database db)
// records: a memory miss, a Redis hit and a reconnect each. An instance is
// replaced after visiting all n. Besides round trips, it reports the time
// of the Acquire's I/O (its Redis calls and its Connect, timed where they
// are made) and the rest, the pool's own time, each per call.
func benchWarm(b *testing.B, key string, db, n int, p sandboxpool.Provider) {
	type warm struct {
		rdb            redis.UniversalClient
		calls, redisNs *atomic.Int64
	}
	w := fixture(key, func() (warm, func()) {
		c, closer := openRedis(db)
		owner := newBenchManager(p, c)
		fill(nil, owner, n)
		calls, ns := new(atomic.Int64), new(atomic.Int64)
		c.AddHook(countingHook{n: calls, ns: ns})
		return warm{c, calls, ns}, func() { _ = owner.Close(context.Background()); closer() }
	})
	ctx := context.Background()
	var reader *sandboxpool.Manager
	connectNs := new(atomic.Int64)
	p = ioTimer{p, connectNs}
	w.calls.Store(0)
	w.redisNs.Store(0)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%n == 0 { // a fresh instance: every pair is a memory miss and a Redis hit
			b.StopTimer()
			reader = benchManager(b, p, w.rdb)
			b.StartTimer()
		}
		l, err := reader.Acquire(ctx, benchUsers[i%n], benchProjects[i%n])
		if err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
	b.StopTimer()
	b.ReportMetric(float64(w.calls.Load())/float64(b.N), "redis-rt/op")
	io := w.redisNs.Load() + connectNs.Load()
	b.ReportMetric(float64(io)/float64(b.N)/1e3, "io-µs/op")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds()-io)/float64(b.N)/1e3, "own-µs/op")
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(d)
	return d[len(d)/2], d[len(d)*99/100]
}

// benchStampede runs n concurrent Acquires per iteration, acquire(it, i) for
// i in [0,n), and reports creates per pair and the p50/p99 latency.
func benchStampede(b *testing.B, p *fp.Provider, n, pairs int, acquire func(it, i int) (*sandboxpool.Lease, error)) {
	var (
		lat []time.Duration
		mu  sync.Mutex
	)
	b.ResetTimer()
	for it := range b.N {
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				start := time.Now()
				l, err := acquire(it, i)
				d := time.Since(start)
				if err != nil {
					b.Error(err)
					return
				}
				l.Release()
				mu.Lock()
				lat = append(lat, d)
				mu.Unlock()
			})
		}
		wg.Wait()
	}
	b.StopTimer()
	p50, p99 := percentiles(lat)
	b.ReportMetric(float64(p.Calls(fp.OpCreate))/float64(pairs*b.N), "creates/pair")
	b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
	b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
}

func BenchmarkContention(b *testing.B) {
	ctx := context.Background()
	b.Run("1000-goroutines-one-pair", func(b *testing.B) {
		p := fp.New()
		p.SetLatency(fp.OpCreate, time.Millisecond)
		m := benchManager(b, p, nil)
		benchStampede(b, p, 1000, 1, func(it, _ int) (*sandboxpool.Lease, error) {
			return m.Acquire(ctx, "u", "pair"+strconv.Itoa(it))
		})
	})
	b.Run("8-managers-100-pairs", func(b *testing.B) {
		rdb := benchRedis(b)
		p := fp.New()
		p.SetLatency(fp.OpCreate, time.Millisecond)
		ms := make([]*sandboxpool.Manager, 8)
		for i := range ms {
			ms[i] = benchManager(b, p, rdb)
		}
		benchStampede(b, p, 2000, 100, func(it, i int) (*sandboxpool.Lease, error) {
			return ms[i%8].Acquire(ctx, fmt.Sprint("u", it), fmt.Sprint("p", i%100))
		})
	})
}

const millionPairs = 1_000_000

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func BenchmarkMemoryPerPair(b *testing.B) {
	for range b.N {
		clk := newFakeClock()
		cfg := sandboxpool.Config{Provider: &nullProvider{}, IdleTimeout: time.Hour, MaxAge: 2 * time.Hour, HealthCheckAfter: time.Hour}
		sandboxpool.SetClock(&cfg, clk.Now)
		sandboxpool.ManualReaper(&cfg)
		m, err := sandboxpool.New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		before := heapInUse()
		fill(b, m, millionPairs)
		full := heapInUse()
		clk.Advance(2 * time.Hour)
		m.ReapNow()
		for m.Stats().Active > 0 || m.Scheduled() > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(100 * time.Millisecond) // background kills finish
		after := heapInUse()
		_ = m.Close(context.Background())
		b.ReportMetric(float64(before)/1e6, "heap-start-MB")
		b.ReportMetric(float64(after)/1e6, "heap-after-churn-MB")
		b.ReportMetric(float64(full-before)/millionPairs, "B/pair")
		b.ReportMetric(float64(int64(after)-int64(before))/float64(before)*100, "heap-after-churn-%")
	}
}

func BenchmarkReaperTickIdle(b *testing.B) {
	m := fixture("reaper-1M", func() (*sandboxpool.Manager, func()) {
		cfg := sandboxpool.Config{Provider: &nullProvider{}, IdleTimeout: time.Hour, MaxAge: 2 * time.Hour, HealthCheckAfter: time.Hour}
		sandboxpool.SetClock(&cfg, newFakeClock().Now)
		sandboxpool.ManualReaper(&cfg)
		m, err := sandboxpool.New(cfg)
		if err != nil {
			panic(err)
		}
		fill(nil, m, millionPairs)
		return m, func() { _ = m.Close(context.Background()) }
	})
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		m.ReapNow()
	}
	b.StopTimer()
	if m.Stats().Active != millionPairs {
		b.Fatal("the tick evicted something")
	}
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// TestCountingHookLeavesOutTheHandshake: a fresh client's first command
// dials, and go-redis's handshake on the new connection (HELLO, then SELECT
// for a database other than 0) runs through the hooks; the hook counts the
// command alone.
func TestCountingHookLeavesOutTheHandshake(t *testing.T) {
	mr := miniredis.RunT(t)
	n := new(atomic.Int64)
	c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr(), DB: 1})
	defer c.Close()
	c.AddHook(countingHook{n: n})
	ctx := context.Background()
	require.NoError(t, c.Set(ctx, "k", "v", 0).Err())
	require.Equal(t, int64(1), n.Load(), "one SET, on a connection dialed for it")
	_, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Get(ctx, "k")
		p.Get(ctx, "k")
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, int64(2), n.Load(), "a pipeline is one round trip")
}
