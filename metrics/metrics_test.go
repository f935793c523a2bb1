package metrics_test

import (
	"context"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	"github.com/sandboxpool/sandboxpool/internal/fakeprovider"
	"github.com/sandboxpool/sandboxpool/metrics"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var camel = regexp.MustCompile(`([a-z0-9])([A-Z])`)

func snake(s string) string { return strings.ToLower(camel.ReplaceAllString(s, "${1}_${2}")) }

// Every Stats field is exported under its snake_case name, the values are
// the Manager's, Acquire latencies are observed by outcome, and the metrics
// pass Prometheus's own lint.
func TestCollectorExportsEveryStat(t *testing.T) {
	met := metrics.New("svc")
	m, err := sandboxpool.New(sandboxpool.Config{Provider: fakeprovider.New(), OnAcquire: met.ObserveAcquire})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	ctx := context.Background()
	for range 3 {
		l, err := m.Acquire(ctx, "u", "p")
		require.NoError(t, err)
		l.Release()
	}
	_, err = m.Acquire(ctx, "bad user", "p")
	require.ErrorIs(t, err, sandboxpool.ErrInvalidID)

	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(met.Collector(m)))
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	assert.Empty(t, problems)

	got := gather(t, reg)
	find := func(name string) (float64, bool) {
		for _, full := range []string{"svc_sandboxpool_" + name + "_total", "svc_sandboxpool_" + name} {
			if v, ok := got[full]; ok {
				return v, true
			}
		}
		return 0, false
	}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := range v.NumField() {
			f := v.Type().Field(i)
			name := prefix + snake(f.Name)
			switch fv := v.Field(i); fv.Kind() {
			case reflect.Struct:
				walk(map[string]string{"Redis": "redis_pool_", "E2B": "e2b_"}[f.Name], fv)
			default:
				_, ok := find(name)
				assert.True(t, ok, "Stats.%s has no metric %s", f.Name, name)
			}
		}
	}
	walk("", reflect.ValueOf(m.Stats()))

	for name, want := range map[string]float64{"acquires": 3, "memory_hits": 2, "creates": 1, "active": 1, "leased": 0, "key_locks": 0} {
		v, _ := find(name)
		assert.Equal(t, want, v, name)
	}
	assert.Equal(t, 1.0, got["svc_sandboxpool_acquire_duration_seconds{created}"])
	assert.Equal(t, 2.0, got["svc_sandboxpool_acquire_duration_seconds{memory_hit}"])
}

// A registry may collect from several scrapes at once, with no Describe
// between (a collector gathered without registration has none at all): the
// collector must be safe for that, under the race detector.
func TestCollectIsSafeConcurrently(t *testing.T) {
	m, err := sandboxpool.New(sandboxpool.Config{Provider: fakeprovider.New()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	c := metrics.New("svc").Collector(m)
	var wg sync.WaitGroup
	counts := make([]int, 4)
	for i := range counts {
		wg.Go(func() {
			ch := make(chan prometheus.Metric)
			go func() { c.Collect(ch); close(ch) }()
			for range ch {
				counts[i]++
			}
		})
	}
	wg.Wait()
	for _, n := range counts {
		assert.Equal(t, counts[0], n, "every scrape sees every metric")
	}
	assert.Positive(t, counts[0])
}

// Metric types follow the Stats fields' kinds: go-redis's stale-connection
// count only grows, so it is a counter; and every outcome's latency series
// exists before its first observation, so a rate over it is defined.
func TestMetricTypesAndSeries(t *testing.T) {
	m, err := sandboxpool.New(sandboxpool.Config{Provider: fakeprovider.New()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(metrics.New("svc").Collector(m)))
	families, err := reg.Gather()
	require.NoError(t, err)
	types := map[string]string{}
	outcomes := map[string]uint64{}
	for _, f := range families {
		types[f.GetName()] = f.GetType().String()
		if f.GetName() == "svc_sandboxpool_acquire_duration_seconds" {
			for _, mt := range f.GetMetric() {
				outcomes[mt.GetLabel()[0].GetValue()] = mt.GetHistogram().GetSampleCount()
			}
		}
	}
	assert.Equal(t, "COUNTER", types["svc_sandboxpool_redis_pool_stale_conns_total"])
	assert.Equal(t, "GAUGE", types["svc_sandboxpool_redis_pool_idle_conns"])
	assert.Equal(t, map[string]uint64{"error": 0, "memory_hit": 0, "cache_hit": 0, "created": 0}, outcomes)
}

// BenchmarkObserveAcquire: an observation through ObserveAcquire, whose
// per-outcome children are looked up once, against the baseline of looking
// the child up by label on every call, as ObserveAcquire did before.
func BenchmarkObserveAcquire(b *testing.B) {
	met := metrics.New("svc")
	vec := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "baseline_seconds"}, []string{"outcome"})
	b.Run("baseline-WithLabelValues", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			vec.WithLabelValues(sandboxpool.OutcomeMemoryHit.String()).Observe(1e-7)
		}
	})
	b.Run("ObserveAcquire", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			met.ObserveAcquire(sandboxpool.OutcomeMemoryHit, 100*time.Nanosecond)
		}
	})
}

// With the E2B provider, the E2B client's requests, retries and retry
// quotas are exported too.
func TestCollectorExportsTheE2BClient(t *testing.T) {
	fake := e2btest.Start(e2btest.Config{})
	t.Cleanup(fake.Close)
	client, err := e2b.New(fake.ClientOptions())
	require.NoError(t, err)
	t.Cleanup(client.CloseIdleConnections)
	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)})
	require.NoError(t, err)
	fake.Inject(e2btest.OpCreate, e2btest.Fault{Status: 429}) // a refusal: the create is retried
	l, err := m.Acquire(context.Background(), "u", "p")
	require.NoError(t, err)
	l.Release()
	require.NoError(t, m.Close(context.Background()))

	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(metrics.New("svc").Collector(m)))
	values := gather(t, reg)
	for name, want := range map[string]float64{
		"svc_sandboxpool_e2b_requests_total":       float64(fake.Requests()),
		"svc_sandboxpool_e2b_retries_total":        1,
		"svc_sandboxpool_e2b_retries_unsent_total": 0,
		"svc_sandboxpool_e2b_retry_tokens_api":     e2b.DefaultRetryQuota,
		"svc_sandboxpool_e2b_retry_tokens_envd":    e2b.DefaultRetryQuota,
	} {
		got, err := testutil.GatherAndCount(reg, name)
		require.NoError(t, err)
		require.Equal(t, 1, got, name)
		assert.Equal(t, want, values[name], name)
	}
	assert.Positive(t, fake.Requests())
}

// gather returns every metric reg gathers by name: a counter's or a
// gauge's value, and a histogram's sample count under name{label value}.
func gather(t *testing.T, reg prometheus.Gatherer) map[string]float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	got := map[string]float64{}
	for _, f := range families {
		for _, mt := range f.GetMetric() {
			switch {
			case mt.GetCounter() != nil:
				got[f.GetName()] = mt.GetCounter().GetValue()
			case mt.GetGauge() != nil:
				got[f.GetName()] = mt.GetGauge().GetValue()
			case mt.GetHistogram() != nil:
				got[f.GetName()+"{"+mt.GetLabel()[0].GetValue()+"}"] = float64(mt.GetHistogram().GetSampleCount())
			}
		}
	}
	return got
}
