package e2b

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

var (
	// ErrNotFound is matched (errors.Is) by an *APIError that says
	// definitively that a sandbox does not exist: a 404 on an operation that
	// names a sandbox. A 404 on create (unknown template) does not match.
	ErrNotFound = errors.New("e2b: sandbox not found")
	// ErrOutcomeUnknown marks a create whose request may have reached E2B
	// although no answer came back (a timeout, a dropped connection, a 5xx):
	// a sandbox may exist. Find it by its metadata before creating again.
	ErrOutcomeUnknown = errors.New("e2b: outcome unknown")
	// ErrUnreachable is matched by an error of a call that got no answer
	// from E2B (a refused or dropped connection, a failed read), after its
	// retries: the API or the sandbox's envd could not be reached, and a
	// later try may succeed. An *APIError is an answer and never matches it,
	// nor does the end of the caller's context.
	ErrUnreachable = errors.New("e2b: unreachable")
)

// APIError is an error answer from E2B's API. Its text never contains the
// API key.
type APIError struct {
	Op         string        // the client method: "create", "connect", …
	SandboxID  string        // the sandbox the call named, if any
	StatusCode int           // HTTP status
	Code       int           // "code" from the body (E2B repeats the status)
	Message    string        // "message" from the body
	ErrorCode  string        // "error_code" from the body, when present
	RetryAfter time.Duration // from Retry-After (429, 503), else 0
}

func (e *APIError) Error() string {
	s := "e2b: " + opName(e.Op, e.SandboxID)
	s += fmt.Sprintf(": %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.ErrorCode != "" {
		s += " (" + e.ErrorCode + ")"
	}
	return s
}

// Is makes errors.Is(err, ErrNotFound) true for a definitive not-found only.
func (e *APIError) Is(target error) bool {
	return target == ErrNotFound && e.StatusCode == http.StatusNotFound && e.SandboxID != ""
}

// RetryAfterHint is how long E2B asked us to wait (sandboxpool.RetryAfter
// reads it through any wrapping).
func (e *APIError) RetryAfterHint() time.Duration { return e.RetryAfter }

// Temporary reports whether retrying the same request may succeed.
func (e *APIError) Temporary() bool { return retryableStatus(e.StatusCode) }

// retryableStatus: rate limited, or a gateway/backend that may recover.
func retryableStatus(code int) bool {
	switch code {
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// transportError is a call's last error when no answer came back.
type transportError struct {
	op, sandboxID string
	err           error
}

func (e *transportError) Error() string {
	return fmt.Sprintf("e2b: %s: %v", opName(e.op, e.sandboxID), e.err)
}

func (e *transportError) Unwrap() []error { return []error{e.err, ErrUnreachable} }

// opName names a call in an error: its operation, and the sandbox it
// concerns when there is one.
func opName(op, sandboxID string) string {
	if sandboxID == "" {
		return op
	}
	return op + " " + sandboxID
}

// unknownOutcome wraps an error of a create that may have happened.
type unknownOutcome struct{ err error }

func (u *unknownOutcome) Error() string {
	return u.err.Error() + " (the sandbox may have been created)"
}
func (u *unknownOutcome) Unwrap() []error {
	return []error{u.err, ErrOutcomeUnknown}
}

func errAs(err error, target any) bool { return err != nil && errors.As(err, target) }
