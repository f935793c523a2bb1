package sandboxpool

import (
	"sync/atomic"

	"github.com/sandboxpool/sandboxpool/e2b"
)

// Stats is a snapshot of a Manager's counters and gauges. Counters only
// grow; gauges are current values.
type Stats struct {
	// Counters.
	Acquires         int64 // Acquire calls that passed validation
	MemoryHits       int64 // served from memory with no I/O
	CacheHits        int64 // memory miss, found in Redis (or adopted from the provider), reconnected
	CacheMisses      int64 // memory miss that had to create
	Creates          int64 // sandboxes created
	CreateErrors     int64 // failed creates
	Adopted          int64 // existing sandboxes found by metadata and adopted instead of created
	Reconnects       int64 // successful Provider.Connect calls
	HealthChecks     int64 // Provider.Check calls
	HealthCheckSkips int64 // memory hits that skipped the probe (same as MemoryHits)
	Replaced         int64 // cached sandboxes replaced after a definitive not-found, or condemned as unresponsive
	Unresponsive     int64 // sandboxes killed after Config.UnresponsiveAfter of failed probes (each also counted in Replaced)
	Spared           int64 // condemnations held back: 3 or more sandboxes unresponsive and no probe answering since (see README)
	Touches          int64 // deadline extensions pushed to the provider (and Redis)
	TouchErrors      int64 // deadline extensions the provider refused or did not answer (a sandbox in use is kept; see README, E2B refuses keepalives)
	Evictions        int64 // sandboxes reaped for idleness or age
	Kills            int64 // Provider.Kill calls that succeeded
	KillErrors       int64 // Provider.Kill calls that failed
	RateLimited      int64 // creates refused by CreateLimit
	QuotaRejected    int64 // creates refused by MaxSandboxes or MaxPerUser
	RedisErrors      int64 // failed Redis calls
	DegradedCreates  int64 // creates made without the Redis lock while Redis (or the Cluster master holding their keys) was down
	LockLost         int64 // creates whose Redis lock was lost before publishing (the sandbox kept if it is the pair's, else killed)
	Reconciled       int64 // creates with an unknown outcome whose sandbox was then found by metadata
	Superseded       int64 // pooled sandboxes retired because Redis names another sandbox for the pair
	Resubscribed     int64 // times Redis confirmed the removal subscription after a time without one (lost, or not confirmed at New); each rechecks the pooled sandboxes Redis no longer names

	// Gauges.
	Active        int64 // sandboxes in this process's pool
	Leased        int64 // leases held on sandboxes in the pool
	KeyLocks      int64 // per-pair lock entries (in-flight acquires) in memory
	RedisDegraded bool  // the Redis circuit breaker is open
	// RedisEvicts says whether a master of the pool's Redis evicts keys
	// when full (a maxmemory, and a policy other than noeviction): the
	// create locks and records it drops let duplicates through (see
	// Config.Redis). The Manager reads each master's policy from New on,
	// and again every minute, so it follows a policy changed live, both
	// ways; false until a master has answered.
	RedisEvicts bool
	// UnannouncedRemovals are removals whose Redis calls got no answer,
	// kept until Redis answers again (see Manager.Remove).
	UnannouncedRemovals int64
	// UnpublishedSandboxes are sandboxes this process created (or could
	// not publish) while Redis did not answer, in its pool but not yet in
	// Redis: no other instance can reuse them until Redis answers again
	// (or Close) and they are published.
	UnpublishedSandboxes int64

	// Redis is the Redis client's own connection-pool statistics (zero
	// without Redis).
	Redis RedisPoolStats
	// E2B is the E2B client's requests, retries and retry quotas, when
	// the Provider is NewE2BProvider's (zero with another Provider). They
	// are the client's, not the Manager's: Managers sharing one client
	// report the same figures.
	E2B e2b.Stats
}

// RedisPoolStats mirrors go-redis's pool statistics.
type RedisPoolStats struct {
	Hits       uint32 // counter: connections reused from the pool
	Misses     uint32 // counter: connections that had to be dialled
	Timeouts   uint32 // counter: waits for a connection that timed out
	TotalConns uint32 // gauge: connections open
	IdleConns  uint32 // gauge: connections idle
	StaleConns uint32 // counter: stale connections removed (go-redis only ever adds to it)
}

// counters are the Manager's counters. Only atomics: any goroutine may bump
// them and Stats reads them without a lock.
type counters struct {
	cacheHits, cacheMisses, creates, createErrors, adopted, reconnects             atomic.Int64
	healthChecks, replaced, touches, touchErrors, evictions, kills, killErrors     atomic.Int64
	rateLimited, quotaRejected, redisErrors, degradedCreates, lockLost, reconciled atomic.Int64
	superseded, unresponsive, spared, resubscribed                                 atomic.Int64
}

// Stats returns a snapshot of the Manager's counters and gauges. It costs
// O(pooled pairs) (the Leased gauge is summed from the pool, which keeps it
// off the hot path): call it for metrics, not per request.
func (m *Manager) Stats() Stats {
	st := Stats{
		CacheHits:       m.ctr.cacheHits.Load(),
		CacheMisses:     m.ctr.cacheMisses.Load(),
		Creates:         m.ctr.creates.Load(),
		CreateErrors:    m.ctr.createErrors.Load(),
		Adopted:         m.ctr.adopted.Load(),
		Reconnects:      m.ctr.reconnects.Load(),
		HealthChecks:    m.ctr.healthChecks.Load(),
		Replaced:        m.ctr.replaced.Load(),
		Unresponsive:    m.ctr.unresponsive.Load(),
		Spared:          m.ctr.spared.Load(),
		Touches:         m.ctr.touches.Load(),
		Evictions:       m.ctr.evictions.Load(),
		Kills:           m.ctr.kills.Load(),
		KillErrors:      m.ctr.killErrors.Load(),
		TouchErrors:     m.ctr.touchErrors.Load(),
		RateLimited:     m.ctr.rateLimited.Load(),
		QuotaRejected:   m.ctr.quotaRejected.Load(),
		RedisErrors:     m.ctr.redisErrors.Load(),
		DegradedCreates: m.ctr.degradedCreates.Load(),
		LockLost:        m.ctr.lockLost.Load(),
		Reconciled:      m.ctr.reconciled.Load(),
		Superseded:      m.ctr.superseded.Load(),
		Resubscribed:    m.ctr.resubscribed.Load(),
		Active:          m.pool.active.Load(),
		KeyLocks:        m.pool.keyLocks.Load(),
	}
	for _, sh := range m.pool.shards {
		st.Acquires += sh.slowAcquires.Load()
		sh.mu.RLock()
		hits, leased := sh.hitsAndLeasesLocked()
		sh.mu.RUnlock()
		st.MemoryHits += hits
		st.Leased += leased
	}
	st.UnannouncedRemovals = int64(m.unannouncedCount())
	st.UnpublishedSandboxes = int64(m.unpublishedCount())
	st.Acquires += st.MemoryHits
	st.HealthCheckSkips = st.MemoryHits
	m.redisStats(&st)
	if p, ok := m.provider.(*e2bProvider); ok {
		st.E2B = p.c.Stats()
	}
	return st
}
