package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// The Redis side of the pool: one hash per pair,
//
//	<ns>:{<user>:<project>}:sbx  id, tpl, created (unix ms), deadline (unix ms)
//
// expiring (PEXPIREAT) at the pair's deadline, so no key outlives its
// sandbox, and carrying the idle clock (deadline) that every instance
// extends and reads before evicting. Every call has its own RedisTimeout
// and runs through the circuit breaker (breaker.go), never under a pool
// lock.

// record is a pair's entry in Redis.
type record struct {
	id       string
	template string
	created  int64 // unix ns
	deadline int64 // unix ns
}

const (
	fieldID       = "id"
	fieldTemplate = "tpl"
	fieldCreated  = "created"
	fieldDeadline = "deadline"
)

var (
	// luaPublish writes the record only while our lock token holds, so a
	// creator whose lock expired (stalled past LockTTL) cannot publish.
	// KEYS: sbx, lock (one hash tag: one slot); ARGV: token, id, tpl, created, deadline.
	luaPublish = redis.NewScript(`
if redis.call("get", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("del", KEYS[1])
redis.call("hset", KEYS[1], "id", ARGV[2], "tpl", ARGV[3], "created", ARGV[4], "deadline", ARGV[5])
redis.call("pexpireat", KEYS[1], ARGV[5])
return 1
`)
	// luaAdopt writes the record if the pair has none (reconciling a create
	// made while Redis was down). It returns the id that is now canonical.
	// A record created at or before ARGV[5] is past MaxAge (no Acquire is
	// given its sandbox again, though a holder's keepalive may keep the
	// record alive), and one whose time does not parse is no record: both
	// count as none, as they do for fromCache.
	// KEYS: sbx; ARGV: id, tpl, created, deadline, stale (ms).
	luaAdopt = redis.NewScript(`
local cur = redis.call("hmget", KEYS[1], "id", "created")
if cur[1] then
  local created = tonumber(cur[2])
  if created and created > tonumber(ARGV[5]) then return cur[1] end
  redis.call("del", KEYS[1])
end
redis.call("hset", KEYS[1], "id", ARGV[1], "tpl", ARGV[2], "created", ARGV[3], "deadline", ARGV[4])
redis.call("pexpireat", KEYS[1], ARGV[4])
return ARGV[1]
`)
	// luaTouch extends the deadline (never shortens it) if the record still
	// names our sandbox, and returns the deadline now in force; 0 when the
	// pair has no record, or one created at or before ARGV[3] or whose time
	// does not parse (as luaAdopt reads them); -1 when it names another
	// sandbox. KEYS: sbx; ARGV: id, deadline, stale (ms).
	luaTouch = redis.NewScript(`
local rec = redis.call("hmget", KEYS[1], "id", "created", "deadline")
if not rec[1] then return 0 end
if rec[1] ~= ARGV[1] then
  local created = tonumber(rec[2])
  if created and created > tonumber(ARGV[3]) then return -1 end
  return 0
end
local cur = tonumber(rec[3] or "0")
local want = tonumber(ARGV[2])
if want > cur then
  redis.call("hset", KEYS[1], "deadline", ARGV[2])
  redis.call("pexpireat", KEYS[1], ARGV[2])
  return want
end
return cur
`)
	// luaCompareDelete deletes the record only if it names our sandbox, so a
	// stale remover never deletes a newer sandbox's key. KEYS: sbx; ARGV: id.
	luaCompareDelete = redis.NewScript(`
if redis.call("hget", KEYS[1], "id") == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
`)
)

func msToNs(ms int64) int64 { return ms * int64(time.Millisecond) }
func nsToMs(ns int64) int64 { return ns / int64(time.Millisecond) }

// sbxKey is the pair's record key.
func (st *store) sbxKey(k pairKey) string  { return k.redisKey(st.ns, "sbx") }
func (st *store) lockKey(k pairKey) string { return k.redisKey(st.ns, "lock") }

// errCorruptRecord is a pair's record that Redis returned but that does not
// parse: another program's key, or a hand edit. The next publish rewrites
// it.
var errCorruptRecord = errors.New("corrupt record")

// get reads the pair's record; ok is false when there is none.
func (st *store) get(ctx context.Context, k pairKey) (rec record, ok bool, err error) {
	err = st.do(ctx, func(ctx context.Context) error {
		vals, err := st.rdb.HGetAll(ctx, st.sbxKey(k)).Result()
		if err != nil {
			return err
		}
		if rec, ok, err = parseRecord(vals); err != nil {
			return fmt.Errorf("%w %s: %w", errCorruptRecord, st.sbxKey(k), err)
		}
		return nil
	})
	return rec, ok, err
}

// maxRecordMs is the latest time a record may hold, in unix ms: the
// latest a unix-ns int64 can hold (the year 2262).
const maxRecordMs = math.MaxInt64 / int64(time.Millisecond)

// parseRecord reads a pair's record as HGETALL returns it; ok is false
// for none (no id). Its times must be unix ms between 1970 and
// maxRecordMs: anything else is no time this library wrote, and would
// overflow as nanoseconds.
func parseRecord(vals map[string]string) (rec record, ok bool, err error) {
	if vals[fieldID] == "" {
		return record{}, false, nil
	}
	ms := func(field string) int64 {
		v, perr := strconv.ParseInt(vals[field], 10, 64)
		if perr == nil && (v < 0 || v > maxRecordMs) {
			perr = fmt.Errorf("%s %d out of range", field, v)
		}
		err = errors.Join(err, perr)
		return v
	}
	created, deadline := ms(fieldCreated), ms(fieldDeadline)
	if err != nil {
		return record{}, false, err
	}
	return record{id: vals[fieldID], template: vals[fieldTemplate], created: msToNs(created), deadline: msToNs(deadline)}, true, nil
}

// recordIDs returns the sandbox each pair's record names ("" where there is
// none), read in one pipeline.
func (st *store) recordIDs(ctx context.Context, ks []pairKey) ([]string, error) {
	ids := make([]string, len(ks))
	err := st.do(ctx, func(ctx context.Context) error {
		cmds, err := st.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, k := range ks {
				p.HGet(ctx, st.sbxKey(k), fieldID)
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		for i, c := range cmds {
			ids[i] = c.(*redis.StringCmd).Val()
		}
		return nil
	})
	return ids, err
}

// publish writes s as the pair's record if token still holds the lock.
func (st *store) publish(ctx context.Context, s *slot, token string) (bool, error) {
	var n int64
	err := st.do(ctx, func(ctx context.Context) (err error) {
		n, err = luaPublish.Run(ctx, st.rdb, []string{st.sbxKey(s.key), st.lockKey(s.key)},
			token, s.id, s.shape.template, nsToMs(s.createdAt), nsToMs(s.deadline.Load())).Int64()
		return err
	})
	if n == 1 {
		st.writesAccepted()
	}
	return n == 1, err
}

// adopt writes s, with deadline, as the pair's record unless one exists
// that was created after stale (unix ns; see Manager.stale); it returns
// the canonical id.
func (st *store) adopt(ctx context.Context, s *slot, deadline, stale int64) (string, error) {
	var id string
	err := st.do(ctx, func(ctx context.Context) (err error) {
		id, err = luaAdopt.Run(ctx, st.rdb, []string{st.sbxKey(s.key)},
			s.id, s.shape.template, nsToMs(s.createdAt), nsToMs(deadline), nsToMs(stale)).Text()
		return err
	})
	if err == nil && id == s.id {
		st.writesAccepted()
	}
	return id, err
}

// stale is the latest creation time (unix ns) of a record no Acquire is
// given now: one past MaxAge, hotGuard included (see staleAt). Such a
// record names no sandbox of the pair's: a holder's keepalive may keep it
// alive past MaxAge, but a sandbox that Redis does not name yet (created
// while Redis was down) is written over it, not retired as its duplicate.
func (m *Manager) stale() int64 { return m.staleAt(m.clock.precise()) }

// staleAt is stale at now (unix ns): a sandbox created at or before it is
// past MaxAge, hotGuard included, and is not reconnected (fromCache),
// adopted (adoptFound) or written back to Redis (cacheTouch) again.
func (m *Manager) staleAt(now int64) int64 { return now + m.guard - int64(m.cfg.MaxAge) }

// adopt writes s, with deadline, as its pair's record unless the pair has
// one that an Acquire may still be given; it returns the canonical id.
func (m *Manager) adopt(ctx context.Context, s *slot, deadline int64) (string, error) {
	return m.store.adopt(ctx, s, deadline, m.stale())
}

// What a read of the pair's record found instead of a deadline (touch and
// remoteDeadline).
const (
	recordAbsent     = 0  // the pair has no record (expired, deleted, or lost with Redis's data)
	recordSuperseded = -1 // the record names another sandbox: ours is a duplicate
	recordUnknown    = -2 // Redis failed: another instance might be using the sandbox
)

// touch extends the record's deadline if it names s's sandbox, and returns
// the deadline in force, or recordAbsent (also for a record created at or
// before stale, unix ns; see Manager.stale), or recordSuperseded.
func (st *store) touch(ctx context.Context, s *slot, deadline, stale int64) (int64, error) {
	var ms int64
	err := st.do(ctx, func(ctx context.Context) (err error) {
		ms, err = luaTouch.Run(ctx, st.rdb, []string{st.sbxKey(s.key)}, s.id, nsToMs(deadline), nsToMs(stale)).Int64()
		return err
	})
	if err == nil && ms == nsToMs(deadline) {
		st.writesAccepted() // it extended the record, or found it extended that far
	}
	if ms <= 0 {
		return ms, err
	}
	return msToNs(ms), err
}

// compareDelete removes the record if it names id, and reports whether it did.
func (st *store) compareDelete(ctx context.Context, k pairKey, id string) (bool, error) {
	var n int64
	err := st.do(ctx, func(ctx context.Context) (err error) {
		n, err = luaCompareDelete.Run(ctx, st.rdb, []string{st.sbxKey(k)}, id).Int64()
		return err
	})
	return n == 1, err
}

// del removes the pair's record whatever it names (Remove).
func (st *store) del(ctx context.Context, k pairKey) error {
	return st.do(ctx, func(ctx context.Context) error { return st.rdb.Del(ctx, st.sbxKey(k)).Err() })
}

// fromCache finds the pair's sandbox in Redis and reconnects to it with the
// pair's aligned deadline. It returns nil, nil on a miss, which a record
// that does not parse counts as (the next publish rewrites it). A read
// that Redis failed is no miss: it returns the error, and the create path
// decides what that means. A definitive not-found deletes the record
// (compare-and-delete) and is a miss.
func (m *Manager) fromCache(ctx context.Context, sh *shard, k pairKey) (*slot, error) {
	if m.store == nil {
		return nil, nil
	}
	rec, ok, err := m.store.get(ctx, k)
	switch {
	case err != nil && !answered(err):
		return nil, pairErr("read Redis record", k, err)
	case err != nil || !ok:
		return nil, nil
	}
	now := m.clock.precise()
	// A record made in this instance's future (another instance's clock
	// ahead, or a hand edit) is timed from now: MaxAge is never stretched
	// past now+MaxAge.
	rec.created = min(rec.created, now)
	if rec.created <= m.staleAt(now) {
		// Past MaxAge: not handed out again. Its holders retire it; the
		// record makes way for a new sandbox.
		_, _ = m.store.compareDelete(ctx, k, rec.id)
		return nil, nil
	}
	s, err := m.connect(ctx, k, rec.id, rec.created, now)
	if errors.Is(err, ErrSandboxNotFound) {
		m.ctr.replaced.Add(1)
		_, _ = m.store.compareDelete(ctx, k, rec.id)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	m.ctr.cacheHits.Add(1)
	if rec.deadline-now >= m.touchAhead {
		// Redis's deadline is comfortably ahead: save the round trip. Track
		// the earlier of the two deadlines, so the reaper pushes Redis
		// before another instance could think the sandbox idle.
		s.deadline.Store(min(s.deadline.Load(), rec.deadline))
		m.refreshHit(s)
	} else if _, err := m.store.touch(ctx, s, s.deadline.Load(), m.stale()); err != nil {
		m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: extending Redis deadline failed", attrErr(err))
	}
	m.park(sh, s)
	return s, nil
}

// uncache deletes the pair's Redis entry whatever sandbox it names, and
// its quota places (Remove). A failure of Redis itself is ErrUnavailable:
// the sandboxes are killed, and a Remove tried again finishes the job.
func (m *Manager) uncache(ctx context.Context, k pairKey) error {
	if m.store == nil {
		return nil
	}
	err := m.store.del(ctx, k)
	if err == nil {
		err = m.store.unreserve(ctx, k)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errRedisUnavailable): // as store.do judged it
		err = fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return pairErr("delete Redis record", k, err)
}

// uncacheSlot deletes the pair's Redis entry if it still names s's sandbox,
// and then drops the pair from the cluster-wide quota sets. When the entry
// names another sandbox (the pair's replacement), the pair is still live and
// keeps its place; an entry already gone leaves the quota entries to expire
// at their deadline.
func (m *Manager) uncacheSlot(ctx context.Context, s *slot) {
	if m.store == nil {
		return
	}
	deleted, err := m.store.compareDelete(ctx, s.key, s.id)
	if err != nil {
		m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: deleting Redis record failed", slog.String("sandbox", s.id), attrErr(err))
		return
	}
	if deleted {
		_ = m.store.unreserve(ctx, s.key)
	}
}

// cacheTouch extends the pair's Redis expiry and idle clock to deadline,
// and keeps memory and Redis agreeing on the pair's sandbox: a record that
// is gone (Redis lost its data, or it expired) is written again while s may
// still be handed out, and a record that names another sandbox supersedes s
// (then cacheTouch reports true). A Redis error is logged: the provider
// deadline alone still holds. A sandbox that waits for the catch-up is left
// to it (see awaitsCatchUp).
func (m *Manager) cacheTouch(ctx context.Context, s *slot, deadline int64) (superseded bool) {
	if m.store == nil || m.awaitsCatchUp(s) {
		return false
	}
	stale := m.stale()
	res, err := m.store.touch(ctx, s, deadline, stale)
	if err == nil && res == recordAbsent && s.state() == stateLive && s.createdAt > stale {
		var id string
		if id, err = m.store.adopt(ctx, s, deadline, stale); err == nil && id != s.id {
			res = recordSuperseded
		}
	}
	switch {
	case err != nil:
		m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: extending Redis deadline failed", slog.String("sandbox", s.id), attrErr(err))
		return false
	case res == recordSuperseded:
		m.supersede(ctx, s)
		return true
	}
	m.refreshReservation(ctx, s.key, deadline)
	return false
}

// remoteDeadline returns the pair's deadline in Redis, which is later than
// ours when another instance used the sandbox, or recordAbsent (also
// without Redis, for another sandbox's record past MaxAge: see stale, and
// for a sandbox left to the catch-up: see awaitsCatchUp), recordSuperseded
// or recordUnknown.
func (m *Manager) remoteDeadline(ctx context.Context, s *slot) int64 {
	if m.store == nil || m.awaitsCatchUp(s) {
		return recordAbsent
	}
	rec, ok, err := m.store.get(ctx, s.key)
	switch {
	case err != nil:
		return recordUnknown
	case !ok || rec.id != s.id && rec.created <= m.stale():
		return recordAbsent
	case rec.id != s.id:
		return recordSuperseded
	}
	return rec.deadline
}

func (m *Manager) redisStats(st *Stats) {
	if m.store == nil {
		return
	}
	st.RedisDegraded = m.store.degraded()
	st.RedisEvicts = m.store.evicts.Load()
	if ps := m.store.rdb.PoolStats(); ps != nil {
		st.Redis = RedisPoolStats{Hits: ps.Hits, Misses: ps.Misses, Timeouts: ps.Timeouts,
			TotalConns: ps.TotalConns, IdleConns: ps.IdleConns, StaleConns: ps.StaleConns}
	}
}

// evictionRecheck is how often a Manager reads its Redis's eviction
// policy again once it has read it. A managed Redis's maxmemory and policy
// change while it runs (CONFIG SET, a parameter group applied live, a
// failover to a replica configured otherwise), and Stats().RedisEvicts,
// which alerts are built on, must follow the change both ways, not keep
// what New found until a restart. One INFO memory per master a minute is
// nothing to Redis, and a minute is short next to the hours a
// misconfiguration lasts.
const evictionRecheck = time.Minute

// checkEviction warns when the pool's Redis drops keys when full. Every
// key the pool writes expires, so under a volatile-* policy (volatile-lru
// is the default of ElastiCache, Azure Cache for Redis and Memorystore) as
// under an allkeys-* one, a full Redis drops create locks and records: a
// dropped lock lets a second instance create a sandbox for the pair, and a
// dropped record sends the next instance to create one (guarantee 1 holds
// while Redis keeps what it is given). Without maxmemory, Redis evicts
// nothing, whatever its policy.
//
// New starts it. It reads INFO memory from each master, outside the
// breaker and its turns, every recheck for as long as the Manager runs:
// a master that starts evicting is logged at Warn, one that stops at
// Info, and Stats().RedisEvicts says whether any master that answered
// last evicts. A Redis that does not answer (down when New ran) is asked
// again every interval until it does; one that answers INFO with an error
// (an ACL, a proxy, miniredis) is only logged at Debug, and not asked
// again.
func (m *Manager) checkEviction(interval, recheck time.Duration) {
	var (
		mu       sync.Mutex                // ForEachMaster and ForEachShard call check concurrently
		answered map[string]evictionPolicy // node → its policy, this round
	)
	check := func(ctx context.Context, c redis.Cmdable) error {
		info, err := c.InfoMap(ctx, "memory").Result()
		if err != nil {
			return err
		}
		node := ""
		if c, ok := c.(*redis.Client); ok {
			node = c.Options().Addr
		}
		mu.Lock()
		answered[node] = evictionPolicy{policy: info["Memory"]["maxmemory_policy"], maxmemory: info["Memory"]["maxmemory"]}
		mu.Unlock()
		return nil
	}
	forEach := func(ctx context.Context, c *redis.Client) error { return check(ctx, c) }
	known := map[string]evictionPolicy{} // each master's policy, as it last answered
	wait := interval
	for {
		answered = map[string]evictionPolicy{}
		ctx, cancel := context.WithTimeout(m.baseCtx, m.cfg.RedisTimeout)
		var err error
		canForget := true // an answer from every node asked is one from every node
		switch rdb := m.store.rdb.(type) {
		case *redis.ClusterClient:
			err = rdb.ForEachMaster(ctx, forEach)
		case *redis.Ring:
			err = rdb.ForEachShard(ctx, forEach)
			canForget = false // ForEachShard skips the shards it holds down
		default:
			err = check(ctx, rdb)
		}
		cancel()
		var reply redis.Error
		if errors.As(err, &reply) {
			m.log.LogAttrs(m.baseCtx, slog.LevelDebug, "sandboxpool: cannot read Redis's eviction policy", attrErr(err))
			return
		}
		m.evictionChanged(known, answered, err == nil && canForget) // the calls of check have all returned
		if err == nil {
			wait = recheck
		}
		select {
		case <-m.done:
			return
		case <-time.After(wait):
		}
	}
}

// evictionPolicy is what a master said of its eviction: its
// maxmemory_policy and maxmemory, as INFO memory gives them.
type evictionPolicy struct{ policy, maxmemory string }

// evicts reports whether a master so configured drops keys when full.
func (p evictionPolicy) evicts() bool {
	return p.policy != "" && p.policy != "noeviction" && p.maxmemory != "" && p.maxmemory != "0"
}

// evictionChanged logs each master whose eviction changed between known
// and answered (a Warn when it starts, an Info when it stops), records
// the answers in known, and sets store.evicts. A master that did not
// answer keeps what it said last; after a round every master answered
// (all), the masters that are gone are dropped. A Ring never says all:
// ForEachShard does not ask the shards it holds down, and a shard that
// evicts would be warned of again each time it came back.
func (m *Manager) evictionChanged(known, answered map[string]evictionPolicy, all bool) {
	for node, p := range answered {
		was, ok := known[node]
		known[node] = p
		level, msg := slogWarn, "sandboxpool: Redis evicts keys when full: a create lock or record it drops lets a second sandbox be made for a pair; set maxmemory-policy noeviction"
		switch {
		case p.evicts() == (ok && was.evicts()):
			continue // no change
		case !p.evicts():
			level, msg = slog.LevelInfo, "sandboxpool: Redis no longer evicts keys"
		}
		m.log.LogAttrs(m.baseCtx, level, msg, slog.String("maxmemory_policy", p.policy), slog.String("maxmemory", p.maxmemory), slog.String("node", node))
	}
	evicts := false
	for node, p := range known {
		if _, ok := answered[node]; all && !ok {
			delete(known, node)
			continue
		}
		evicts = evicts || p.evicts()
	}
	m.store.evicts.Store(evicts)
}

// EnvRedisURL names the Redis to share, as redis://[user:password@]host:port/db
// (rediss:// for TLS). ConfigFromEnv builds Config.Redis from it.
const EnvRedisURL = "REDIS_URL"

// redisFromEnv builds the Redis client when REDIS_URL is set. The URL may
// carry a password, so errors name the variable, never its value.
func redisFromEnv(env envSource, c *Config) error {
	u, ok := env(EnvRedisURL)
	if !ok || u == "" {
		return nil
	}
	opts, err := redis.ParseURL(u)
	if err != nil {
		return fmt.Errorf("%s is not a valid redis:// or rediss:// URL", EnvRedisURL)
	}
	opts.ContextTimeoutEnabled = true // RedisTimeout bounds each call (see Config.Redis)
	c.Redis = redis.NewClient(opts)
	return nil
}

func init() { envHooks = append(envHooks, redisFromEnv) }
