// Package metrics exports a sandboxpool.Manager's statistics and Acquire
// latencies to Prometheus. It is a separate package so that the pool itself
// does not depend on Prometheus.
//
//	met := metrics.New("myservice")
//	cfg.OnAcquire = met.ObserveAcquire
//	m, _ := sandboxpool.New(cfg)
//	registry.MustRegister(met.Collector(m))
package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sandboxpool/sandboxpool"
)

// Metrics holds the Acquire latency histograms; build one with New.
type Metrics struct {
	namespace string
	latency   *prometheus.HistogramVec
	// byOutcome is latency's child for each Outcome, looked up once: an
	// observation then hashes no label on the request path, and every
	// outcome's series exists from the start.
	byOutcome [sandboxpool.OutcomeCreated + 1]prometheus.Observer
}

// latencyBuckets span a memory hit (sub-microsecond) to a cold create
// (seconds).
var latencyBuckets = []float64{1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// New returns Metrics whose names start with namespace ("" for none).
func New(namespace string) *Metrics {
	x := &Metrics{namespace: namespace, latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "sandboxpool", Name: "acquire_duration_seconds",
		Help:    "Latency of Manager.Acquire by outcome (memory_hit, cache_hit, created, error).",
		Buckets: latencyBuckets,
	}, []string{"outcome"})}
	for o := range x.byOutcome {
		x.byOutcome[o] = x.latency.WithLabelValues(sandboxpool.Outcome(o).String())
	}
	return x
}

// ObserveAcquire records one Acquire; pass it as sandboxpool.Config.OnAcquire.
func (x *Metrics) ObserveAcquire(o sandboxpool.Outcome, d time.Duration) {
	if int(o) >= len(x.byOutcome) {
		o = sandboxpool.OutcomeError // as Outcome.String names it
	}
	x.byOutcome[o].Observe(d.Seconds())
}

// Collector returns a prometheus.Collector for m's Stats and the latency
// histograms. Register it once per Manager. Its Describe and Collect may
// be called concurrently, as a registry serving several scrapes does.
func (x *Metrics) Collector(m *sandboxpool.Manager) prometheus.Collector {
	return &collector{m: m, x: x, stats: x.descs()}
}

type stat struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(sandboxpool.Stats) float64
}

type collector struct {
	m     *sandboxpool.Manager
	x     *Metrics
	stats []stat // built before the collector is handed out, then only read
}

// descs describes every Stats field as a metric.
func (x *Metrics) descs() []stat {
	ns := x.namespace
	counter := func(name, help string, v func(sandboxpool.Stats) int64) stat {
		return stat{prometheus.NewDesc(prometheus.BuildFQName(ns, "sandboxpool", name+"_total"), help, nil, nil), prometheus.CounterValue,
			func(s sandboxpool.Stats) float64 { return float64(v(s)) }}
	}
	gauge := func(name, help string, v func(sandboxpool.Stats) float64) stat {
		return stat{prometheus.NewDesc(prometheus.BuildFQName(ns, "sandboxpool", name), help, nil, nil), prometheus.GaugeValue, v}
	}
	return []stat{
		counter("acquires", "Acquire calls that passed validation.", func(s sandboxpool.Stats) int64 { return s.Acquires }),
		counter("memory_hits", "Acquires served from memory with no I/O.", func(s sandboxpool.Stats) int64 { return s.MemoryHits }),
		counter("cache_hits", "Acquires that reconnected to a sandbox found in Redis or by metadata.", func(s sandboxpool.Stats) int64 { return s.CacheHits }),
		counter("cache_misses", "Acquires that had to create.", func(s sandboxpool.Stats) int64 { return s.CacheMisses }),
		counter("creates", "Sandboxes created.", func(s sandboxpool.Stats) int64 { return s.Creates }),
		counter("create_errors", "Failed creates.", func(s sandboxpool.Stats) int64 { return s.CreateErrors }),
		counter("adopted", "Sandboxes adopted by metadata.", func(s sandboxpool.Stats) int64 { return s.Adopted }),
		counter("reconnects", "Successful reconnects.", func(s sandboxpool.Stats) int64 { return s.Reconnects }),
		counter("health_checks", "Liveness probes.", func(s sandboxpool.Stats) int64 { return s.HealthChecks }),
		counter("replaced", "Sandboxes replaced after a definitive not-found.", func(s sandboxpool.Stats) int64 { return s.Replaced }),
		counter("touches", "Deadline extensions.", func(s sandboxpool.Stats) int64 { return s.Touches }),
		counter("touch_errors", "Deadline extensions the provider refused or did not answer.", func(s sandboxpool.Stats) int64 { return s.TouchErrors }),
		counter("evictions", "Sandboxes reaped for idleness or age.", func(s sandboxpool.Stats) int64 { return s.Evictions }),
		counter("kills", "Sandboxes killed.", func(s sandboxpool.Stats) int64 { return s.Kills }),
		counter("kill_errors", "Failed kills.", func(s sandboxpool.Stats) int64 { return s.KillErrors }),
		counter("rate_limited", "Creates refused by the rate limit.", func(s sandboxpool.Stats) int64 { return s.RateLimited }),
		counter("quota_rejected", "Creates refused by a quota.", func(s sandboxpool.Stats) int64 { return s.QuotaRejected }),
		counter("redis_errors", "Failed Redis calls.", func(s sandboxpool.Stats) int64 { return s.RedisErrors }),
		counter("degraded_creates", "Creates made while Redis was unavailable.", func(s sandboxpool.Stats) int64 { return s.DegradedCreates }),
		counter("lock_lost", "Creates that lost their Redis lock before publishing.", func(s sandboxpool.Stats) int64 { return s.LockLost }),
		counter("reconciled", "Creates with an unknown outcome whose sandbox was then found by metadata.", func(s sandboxpool.Stats) int64 { return s.Reconciled }),
		counter("unresponsive", "Sandboxes killed and replaced after staying unresponsive for UnresponsiveAfter.", func(s sandboxpool.Stats) int64 { return s.Unresponsive }),
		counter("spared", "Condemnations of unresponsive sandboxes held back: 3 or more unresponsive and no probe answering since.", func(s sandboxpool.Stats) int64 { return s.Spared }),
		counter("superseded", "Pooled sandboxes retired because Redis names another sandbox for the pair.", func(s sandboxpool.Stats) int64 { return s.Superseded }),
		counter("resubscribed", "Times the removal subscription was confirmed after a time without one (each rechecks the pooled sandboxes Redis no longer names).", func(s sandboxpool.Stats) int64 { return s.Resubscribed }),
		counter("health_check_skips", "Memory hits that skipped the liveness probe.", func(s sandboxpool.Stats) int64 { return s.HealthCheckSkips }),
		gauge("active", "Sandboxes in this process's pool.", func(s sandboxpool.Stats) float64 { return float64(s.Active) }),
		gauge("leased", "Leases held.", func(s sandboxpool.Stats) float64 { return float64(s.Leased) }),
		gauge("key_locks", "Per-pair lock entries in memory.", func(s sandboxpool.Stats) float64 { return float64(s.KeyLocks) }),
		gauge("redis_degraded", "1 while the Redis circuit breaker is open.", func(s sandboxpool.Stats) float64 {
			if s.RedisDegraded {
				return 1
			}
			return 0
		}),
		gauge("redis_evicts", "1 while a master of the pool's Redis evicts keys when full (read every minute), which lets duplicates through: set maxmemory-policy noeviction.", func(s sandboxpool.Stats) float64 {
			if s.RedisEvicts {
				return 1
			}
			return 0
		}),
		gauge("unannounced_removals", "Removals kept until Redis answers again.", func(s sandboxpool.Stats) float64 { return float64(s.UnannouncedRemovals) }),
		gauge("unpublished_sandboxes", "Sandboxes created while Redis did not answer, not yet published for other instances to reuse.", func(s sandboxpool.Stats) float64 { return float64(s.UnpublishedSandboxes) }),
		counter("redis_pool_hits", "Redis connections reused from the pool.", func(s sandboxpool.Stats) int64 { return int64(s.Redis.Hits) }),
		counter("redis_pool_misses", "Redis connections that had to be dialled.", func(s sandboxpool.Stats) int64 { return int64(s.Redis.Misses) }),
		counter("redis_pool_timeouts", "Waits for a Redis connection that timed out.", func(s sandboxpool.Stats) int64 { return int64(s.Redis.Timeouts) }),
		gauge("redis_pool_total_conns", "Redis connections in the pool.", func(s sandboxpool.Stats) float64 { return float64(s.Redis.TotalConns) }),
		gauge("redis_pool_idle_conns", "Idle Redis connections.", func(s sandboxpool.Stats) float64 { return float64(s.Redis.IdleConns) }),
		counter("redis_pool_stale_conns", "Stale Redis connections removed from the pool.", func(s sandboxpool.Stats) int64 { return int64(s.Redis.StaleConns) }),
		counter("e2b_requests", "Requests the E2B client sent, first tries and retries, to the API and to envd.", func(s sandboxpool.Stats) int64 { return s.E2B.Requests }),
		counter("e2b_retries", "Retries the E2B client sent.", func(s sandboxpool.Stats) int64 { return s.E2B.Retries }),
		counter("e2b_retries_unsent", "Retries the E2B client's retry quota could not pay for, not sent.", func(s sandboxpool.Stats) int64 { return s.E2B.RetriesUnsent }),
		gauge("e2b_retry_tokens_api", "Tokens left in the E2B client's retry quota for API calls.", func(s sandboxpool.Stats) float64 { return float64(s.E2B.RetryTokensAPI) }),
		gauge("e2b_retry_tokens_envd", "Tokens left in the E2B client's retry quota for envd health checks.", func(s sandboxpool.Stats) float64 { return float64(s.E2B.RetryTokensEnvd) }),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, s := range c.stats {
		ch <- s.desc
	}
	c.x.latency.Describe(ch)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.m.Stats()
	for _, s := range c.stats {
		ch <- prometheus.MustNewConstMetric(s.desc, s.kind, s.value(st))
	}
	c.x.latency.Collect(ch)
}
