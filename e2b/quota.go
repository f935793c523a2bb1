package e2b

import "sync"

// The retry quota's costs, those of the AWS SDKs' standard retry mode: a
// full quota pays for 100 retries of answered failures in a row, and every
// call that succeeds at its first try puts one token back.
const (
	// DefaultRetryQuota is a full quota, in tokens.
	DefaultRetryQuota = 500
	// retryCost is what a retry after an answer (a 5xx, a 429, a 409) takes.
	retryCost = 5
	// retryNoAnswerCost is what a retry after no answer takes, twice an
	// answer's, as the AWS SDKs charge a timeout: a call that got no answer
	// (a dropped connection, a timeout) may have cost the server as much as
	// an answered one, and says less about whether the next try will reach
	// it.
	retryNoAnswerCost = 10
	// firstTryRefund is what a call that succeeded at its first try puts
	// back. A call that succeeded after retries puts back what they took.
	firstTryRefund = 1
)

// retryQuota bounds the retries a Client makes while its calls keep
// failing. Without it, every call a caller makes during an E2B incident is
// sent MaxRetries+1 times, so the incident meets several times the traffic
// E2B sees on a good day, from every instance at once (and E2B's edge
// throttles each source IP, at 20,000 requests in 30 s). With it, once
// failures have spent the quota each call is sent once (see Client.do for
// the waits), and the Client retries again as calls succeed. It is a mutex
// and an int: a call holds the lock for an addition.
type retryQuota struct {
	mu     sync.Mutex
	max    int // 0: no quota, every retry is paid for
	tokens int
}

func newRetryQuota(max int) *retryQuota { return &retryQuota{max: max, tokens: max} }

// take pays cost for one retry and reports whether the quota could.
func (q *retryQuota) take(cost int) bool {
	if q.max == 0 {
		return true
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.tokens < cost {
		return false
	}
	q.tokens -= cost
	return true
}

// succeeded puts back the cost of a successful call's retries (spent), or
// firstTryRefund when it had none, up to a full quota.
func (q *retryQuota) succeeded(spent int) {
	if q.max == 0 {
		return
	}
	if spent == 0 {
		spent = firstTryRefund
	}
	q.mu.Lock()
	q.tokens = min(q.max, q.tokens+spent)
	q.mu.Unlock()
}

// left returns the tokens the quota holds.
func (q *retryQuota) left() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.tokens
}
