package sandboxpool

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors. Test for them with errors.Is; they are always wrapped with
// the pair they concern.
var (
	// ErrInvalidID reports a user or project id that fails validation. The
	// wrapped *ValidationError names the field and the reason.
	ErrInvalidID = errors.New("sandboxpool: invalid id")
	// ErrClosed is returned by calls made after Close, and by an Acquire
	// still waiting when Close cancels background work (wrapping the cause).
	ErrClosed = errors.New("sandboxpool: manager closed")
	// ErrQuotaExceeded is returned when creating a sandbox would exceed
	// MaxSandboxes or MaxPerUser. Reuse of an existing sandbox is never refused.
	ErrQuotaExceeded = errors.New("sandboxpool: quota exceeded")
	// ErrRateLimited is returned when a user's fresh creates exceed
	// CreateLimit. The error is a *RetryAfterError saying when to retry.
	ErrRateLimited = errors.New("sandboxpool: rate limited")
	// ErrSandboxNotFound is the definitive "does not exist / not running"
	// answer of a Provider. It makes the Manager replace a cached sandbox
	// at once; ErrSandboxUnresponsive does after Config.UnresponsiveAfter,
	// and no other error does.
	ErrSandboxNotFound = errors.New("sandboxpool: sandbox not found")
	// ErrSandboxUnresponsive is a Provider's Check answer that the
	// sandbox does not answer although the provider reports it running
	// (E2B: its envd proxy says "not found" while the API says running). An
	// Acquire that meets it fails with it and keeps the sandbox, until the
	// sandbox has been unresponsive for Config.UnresponsiveAfter: then it is
	// killed and replaced. Until then the error carries how long that is
	// (see RetryAfter).
	ErrSandboxUnresponsive = errors.New("sandboxpool: sandbox unresponsive")
	// ErrUnavailable is returned when the Manager cannot coordinate a create
	// with other instances: Redis is unreachable and
	// Config.RefuseCreatesWhenDegraded is set; Redis kept failing the
	// create's calls until CreateTimeout while answering others (the
	// breaker closed); or the pair's create lock vanished under two creates
	// in a row with no sandbox published (a failover or an evicting Redis).
	// Remove returns it when Redis failed to forget the pair (its sandboxes
	// are killed all the same). Retrying later may succeed.
	ErrUnavailable = errors.New("sandboxpool: coordination store unavailable")
)

// errNoSandboxID is a provider's answer to a create that does not name the
// sandbox. The sandbox may exist all the same, so the create's outcome is
// unknown (see outcomeUnknown): publishing an empty id would make every
// instance read the pair as having no sandbox, and create another.
var errNoSandboxID = errors.New("provider answered the create without a sandbox id")

// RetryAfterError carries how long a caller should wait before retrying.
// It wraps ErrRateLimited, ErrQuotaExceeded or a provider error.
type RetryAfterError struct {
	Err        error
	RetryAfter time.Duration
}

func (e *RetryAfterError) Error() string {
	return fmt.Sprintf("%v (retry after %s)", e.Err, e.RetryAfter)
}

func (e *RetryAfterError) Unwrap() error { return e.Err }

// RetryAfter returns the retry hint carried anywhere in err's chain, if any.
func RetryAfter(err error) (time.Duration, bool) {
	var ra interface{ RetryAfterHint() time.Duration }
	if errors.As(err, &ra) {
		return ra.RetryAfterHint(), true
	}
	return 0, false
}

// RetryAfterHint implements the hint interface RetryAfter looks for, so that
// errors from other packages (such as *e2b.APIError) can carry one too.
func (e *RetryAfterError) RetryAfterHint() time.Duration { return e.RetryAfter }

func pairErr(op string, k pairKey, err error) error {
	return fmt.Errorf("sandboxpool: %s %s/%s: %w", op, k.user, k.project, err)
}
