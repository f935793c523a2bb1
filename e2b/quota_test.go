package e2b

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The quota's economics, as Options.RetryQuota states them: with tries
// failing independently, retries are rationed only past about 40% of tries
// failing. Calls are simulated as do makes them (a first try, then up to
// DefaultMaxRetries retries the quota pays for), over the quota itself.
func TestRetryQuotaRationsOnlyPastFortyPercentFailing(t *testing.T) {
	for _, c := range []struct {
		failing   float64
		callsFail [2]float64 // the range the share of failed calls falls in
		unsent    bool       // whether any retry went unsent
	}{
		{0.30, [2]float64{0.005, 0.011}, false}, // 0.3⁴ = 0.8%, as with every retry sent
		{0.40, [2]float64{0.020, 0.031}, false}, // 0.4⁴ = 2.6%
		{0.45, [2]float64{0.10, 0.18}, true},    // 4.1% with every retry sent
		{0.50, [2]float64{0.33, 0.40}, true},    // 6.3% with every retry sent
	} {
		rng := rand.New(rand.NewPCG(1, uint64(c.failing*100)))
		q := newRetryQuota(DefaultRetryQuota)
		const calls = 200_000
		failed, unsent := 0, 0
		for range calls {
			spent, ok := 0, false
			for attempt := 0; attempt <= DefaultMaxRetries && !ok; attempt++ {
				if attempt > 0 {
					if !q.take(retryCost) {
						unsent++
						continue
					}
					spent += retryCost
				}
				ok = rng.Float64() >= c.failing
			}
			if ok {
				q.succeeded(spent)
			} else {
				failed++
			}
		}
		share := float64(failed) / calls
		assert.True(t, share >= c.callsFail[0] && share <= c.callsFail[1], "%.0f%% of tries failing: %.2f%% of calls failed", c.failing*100, share*100)
		assert.Equal(t, c.unsent, unsent > 0, "%.0f%% of tries failing: %d retries unsent", c.failing*100, unsent)
	}
}
