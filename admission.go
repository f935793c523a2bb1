package sandboxpool

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// admission decides whether a fresh create may proceed: the MaxSandboxes
// and MaxPerUser quotas and the per-user CreateLimit. Reuse never passes
// through it. This is the in-process implementation; with Redis the same
// checks run cluster-wide (see cache.go) and this one is the fallback while
// Redis is down.
type admission struct {
	maxTotal, maxPerUser int
	limit                RateLimit
	interval, burst      int64 // GCRA parameters, ns

	mu sync.Mutex // protects the fields below; held for map updates only
	// With a quota, every pair with a sandbox holds one place, shared by
	// the slots of the pair that hold it (a sandbox past MaxAge and its
	// replacement, say), as the pair's one member does in Redis: replacing
	// a pair's sandbox never waits for a place.
	places     map[pairKey]int  // slots holding each pair's place (only with a quota); entries deleted at zero
	total      int              // pairs holding a place
	perUser    map[string]int   // places per user (only with MaxPerUser); entries deleted at zero
	peakPlaces int              // places' peak size since it was last rebuilt (see shrink)
	peakUsers  int              // perUser's
	tat        map[string]int64 // GCRA theoretical arrival time per user
	sweepAt    int              // sweep tat once it grows past this size
}

// minSweep is the tat map size below which sweeping is not worth it.
const minSweep = 1024

func newAdmission(cfg Config) *admission {
	a := &admission{
		maxTotal: cfg.MaxSandboxes, maxPerUser: cfg.MaxPerUser, limit: cfg.CreateLimit,
		places: make(map[pairKey]int), perUser: make(map[string]int), tat: make(map[string]int64), sweepAt: minSweep,
	}
	if cfg.CreateLimit.enabled() {
		a.interval = int64(cfg.CreateLimit.interval())
		a.burst = int64(cfg.CreateLimit.Burst) * a.interval
	}
	return a
}

// quotas reports whether a quota is configured: without one, no place is
// kept, and a million pairs cost no map.
func (a *admission) quotas() bool { return a.maxTotal > 0 || a.maxPerUser > 0 }

// reserve takes a place for a new sandbox of pair k at time now, or says
// why not. A pair that holds a place already shares it, past the quotas.
// withRate applies CreateLimit here (memory-only, or Redis down).
func (a *admission) reserve(k pairKey, now int64, withRate bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	held := a.places[k] > 0
	if !held && a.maxTotal > 0 && a.total >= a.maxTotal {
		return fmt.Errorf("%w: %d sandboxes alive (MaxSandboxes %d)", ErrQuotaExceeded, a.total, a.maxTotal)
	}
	if !held && a.maxPerUser > 0 && a.perUser[k.user] >= a.maxPerUser {
		return fmt.Errorf("%w: user has %d sandboxes (MaxPerUser %d)", ErrQuotaExceeded, a.perUser[k.user], a.maxPerUser)
	}
	if withRate && a.interval > 0 {
		// GCRA: allow when the theoretical arrival time is within the
		// burst tolerance of now.
		tat := max(a.tat[k.user], now)
		if wait := tat + a.interval - a.burst - now; wait > 0 {
			return &RetryAfterError{Err: ErrRateLimited, RetryAfter: time.Duration(wait)}
		}
		a.tat[k.user] = tat + a.interval
		a.sweepLocked(now)
	}
	switch {
	case !a.quotas():
	case held:
		a.places[k]++
	default:
		k = k.clone() // the map outlives the caller's strings
		a.places[k] = 1
		a.places = shrink(a.places, &a.peakPlaces)
		a.total++
		if a.maxPerUser > 0 {
			a.perUser[k.user]++
			a.perUser = shrink(a.perUser, &a.peakUsers)
		}
	}
	return nil
}

// sweepLocked drops GCRA entries that no longer restrict anyone (their tat
// has passed). It runs only when the map has doubled since the last sweep,
// so its cost is amortised O(1) per reservation and the map stays bounded by
// twice the number of recently active users.
func (a *admission) sweepLocked(now int64) {
	if len(a.tat) < a.sweepAt {
		return
	}
	fresh := make(map[string]int64, len(a.tat)/2)
	for u, t := range a.tat {
		if t > now {
			fresh[u] = t
		}
	}
	a.tat = fresh // a new map: deleting from the old one would not free it
	a.sweepAt = max(minSweep, 2*len(a.tat))
}

// release returns a slot's share of pair k's place (a failed create, or a
// sandbox gone); the last share frees the place.
func (a *admission) release(k pairKey) {
	if !a.quotas() {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if n := a.places[k] - 1; n > 0 {
		a.places[k] = n
		return
	}
	delete(a.places, k)
	a.places = shrink(a.places, &a.peakPlaces)
	a.total--
	if a.maxPerUser == 0 {
		return
	}
	if n := a.perUser[k.user] - 1; n > 0 {
		a.perUser[k.user] = n
	} else {
		delete(a.perUser, k.user)
		a.perUser = shrink(a.perUser, &a.peakUsers)
	}
}

// Cluster-wide admission in Redis. Live sandboxes are counted in sorted
// sets scored by their deadline, so entries of instances that died expire
// on their own:
//
//	<ns>:live          every pair with a sandbox (MaxSandboxes)
//	<ns>:{<user>}:live the user's pairs (MaxPerUser)
//	rate:<ns>:{<user>}:rate  GCRA state of the user's create limit (redis_rate)
//
// Each set is reserved by one atomic script; the two sets live in different
// slots (Redis Cluster), so a reservation takes the user's set, then the
// global one, and gives the first back if the second refuses: never more
// than the limits, at worst a refusal while a concurrent rollback runs.
//
// A pair's place is the pair's, shared by every instance that creates it
// or keeps it alive. A reservation adds it, expiring at the create's
// CreateTimeout, or finds it there and leaves it: most creates that find
// it are waiting for the pair's lock and end up taking the sandbox its
// holder publishes, so their own expiry would keep the place past that
// sandbox's end. Once a create holds the lock and finds nothing
// published, it moves the place's expiry forward to its own (never back:
// a keepalive may have pushed it further), and the instance that
// publishes the pair's new sandbox sets it to the sandbox's deadline,
// earlier or later (settleReservation): no create is pending then. The
// scripts compare scores themselves rather than use ZADD GT, which
// needs Redis 6.2: managed Redis 6.0 (Azure Cache for Redis's "6", for
// one) refuses it, and every create with a quota would fail there.
// Only what ends the pair's sandbox (a failed create under the lock, a
// sandbox forgotten, Remove) drops the place, and a rollback drops only a
// place its own reservation added. Every keepalive writes the place again
// (refreshReservation), so a sandbox in use is counted again after Redis
// loses its data.

var (
	// luaReserve: KEYS: set; ARGV: now (ms), member, limit, score (ms).
	// Returns 1 when it added the pair's place, 2 when the pair had one
	// (left as it was), else -count: refused.
	luaReserve = redis.NewScript(`
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[1])
local limit = tonumber(ARGV[3])
local had = redis.call("zscore", KEYS[1], ARGV[2])
if not had then
  local n = redis.call("zcard", KEYS[1])
  if limit > 0 and n >= limit then return -n end
end
if not had then redis.call("zadd", KEYS[1], ARGV[4], ARGV[2]) end
local top = redis.call("zrange", KEYS[1], -1, -1, "WITHSCORES")
redis.call("pexpireat", KEYS[1], top[2])
if had then return 2 end
return 1
`)
	// luaBump writes a live pair's place with its expiry, moved forward
	// only unless ARGV[3] is "settle", and the set's. KEYS: set; ARGV:
	// member, score (ms), mode.
	luaBump = redis.NewScript(`
local had = redis.call("zscore", KEYS[1], ARGV[1])
if ARGV[3] == "settle" or not had or tonumber(had) < tonumber(ARGV[2]) then redis.call("zadd", KEYS[1], ARGV[2], ARGV[1]) end
local top = redis.call("zrange", KEYS[1], -1, -1, "WITHSCORES")
redis.call("pexpireat", KEYS[1], top[2])
return 0
`)
	// luaDrop drops a pair's place and brings the set's expiry back to its
	// latest place's: left where the dropped place had set it, the set's
	// key would outlive every place left. KEYS: set; ARGV: member.
	luaDrop = redis.NewScript(`
redis.call("zrem", KEYS[1], ARGV[1])
local top = redis.call("zrange", KEYS[1], -1, -1, "WITHSCORES")
if top[2] then redis.call("pexpireat", KEYS[1], top[2]) end
return 0
`)
)

func (st *store) liveKey() string                { return st.ns + ":live" }
func (st *store) userLiveKey(user string) string { return st.ns + ":{" + user + "}:live" }
func (st *store) rateKey(user string) string     { return st.ns + ":{" + user + "}:rate" }
func pairMember(k pairKey) string                { return k.user + ":" + k.project }

// quotaSets lists the sets that limits apply to, with their limits.
func (m *Manager) quotaSets(k pairKey) (keys []string, limits []int) {
	if m.cfg.MaxPerUser > 0 {
		keys, limits = append(keys, m.store.userLiveKey(k.user)), append(limits, m.cfg.MaxPerUser)
	}
	if m.cfg.MaxSandboxes > 0 {
		keys, limits = append(keys, m.store.liveKey()), append(limits, m.cfg.MaxSandboxes)
	}
	return keys, limits
}

// reserveRemote applies CreateLimit (once per create: see coordination)
// and the quotas cluster-wide. A refusal wraps ErrRateLimited or
// ErrQuotaExceeded; a Redis failure wraps errRedisUnavailable.
func (m *Manager) reserveRemote(ctx context.Context, k pairKey, co *coordination) error {
	if r := m.cfg.CreateLimit; r.enabled() && !co.rated {
		var res *redis_rate.Result
		err := m.store.do(ctx, func(ctx context.Context) (err error) {
			res, err = m.store.limiter.Allow(ctx, m.store.rateKey(k.user), redis_rate.Limit{Rate: r.Rate, Burst: r.Burst, Period: r.Per})
			return err
		})
		if err != nil {
			return err
		}
		if res.Allowed == 0 {
			return &RetryAfterError{Err: ErrRateLimited, RetryAfter: res.RetryAfter}
		}
		co.rated = true
	}
	keys, limits := m.quotaSets(k)
	now := m.clock.precise()
	co.placeUntil = now + int64(m.cfg.CreateTimeout) // provisional, until published
	score := nsToMs(co.placeUntil)

	var added []string // the places this call added: a refusal gives them back
	for i, key := range keys {
		var n int64
		err := m.store.do(ctx, func(ctx context.Context) (err error) {
			n, err = luaReserve.Run(ctx, m.store.rdb, []string{key}, nsToMs(now), pairMember(k), limits[i], score).Int64()
			return err
		})
		if err == nil && n < 0 {
			err = fmt.Errorf("%w: %d sandboxes alive (limit %d)", ErrQuotaExceeded, -n, limits[i])
		}
		if err != nil {
			rctx, cancel := m.outlive(ctx) // given back even when Close cut the create short
			_ = m.store.dropPlaces(rctx, k, added)
			cancel()
			return err
		}
		if n == 1 {
			added = append(added, key)
		}
	}
	return nil
}

// unreserve drops the pair from the quota sets.
func (st *store) unreserve(ctx context.Context, k pairKey) error {
	return st.dropPlaces(ctx, k, []string{st.liveKey(), st.userLiveKey(k.user)})
}

// dropPlaces drops the pair's place from each of the quota sets keys
// (luaDrop), in one round trip.
func (st *store) dropPlaces(ctx context.Context, k pairKey, keys []string) error {
	if len(keys) == 0 {
		return nil
	}
	return st.do(ctx, func(ctx context.Context) error {
		_, err := st.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, key := range keys {
				// Eval, not EvalSha: a pipeline cannot fall back on NOSCRIPT.
				luaDrop.Eval(ctx, p, []string{key}, pairMember(k))
			}
			return nil
		})
		return err
	})
}

// refreshReservation writes the live pair's quota places with its new
// deadline (moved forward only), in the sets whose limits are configured.
func (m *Manager) refreshReservation(ctx context.Context, k pairKey, deadline int64) {
	m.writePlaces(ctx, k, deadline, "forward")
}

// settleReservation writes the quota places of the pair whose sandbox this
// instance has just made and published with the sandbox's deadline, earlier
// or later than the place held: that was a create's provisional expiry
// (CreateTimeout from its start), and no create of the pair is pending now,
// so the place ends with the sandbox.
func (m *Manager) settleReservation(ctx context.Context, k pairKey, deadline int64) {
	m.writePlaces(ctx, k, deadline, "settle")
}

// writePlaces runs luaBump in mode on each set whose limit is configured.
func (m *Manager) writePlaces(ctx context.Context, k pairKey, deadline int64, mode string) {
	keys, _ := m.quotaSets(k)
	if len(keys) == 0 {
		return
	}
	_ = m.store.do(ctx, func(ctx context.Context) error {
		_, err := m.store.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, key := range keys {
				// Eval, not EvalSha: a pipeline cannot fall back on NOSCRIPT.
				luaBump.Eval(ctx, p, []string{key}, pairMember(k), nsToMs(deadline), mode)
			}
			return nil
		})
		return err
	})
}
