package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
)

// Every error the library returns for a reason a client can act on gets its
// own status: a retryable failure (E2B or Redis out of reach) is a 503, not
// a 500, and carries the library's retry hint.
func TestWriteErrorStatuses(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("sandboxpool: acquire u/p: %w", err) }
	for _, c := range []struct {
		err        error
		status     int
		code       string
		retryAfter string
	}{
		{&sandboxpool.ValidationError{Field: "user", Reason: "empty"}, http.StatusBadRequest, "invalid_id", ""},
		{wrap(&sandboxpool.RetryAfterError{Err: sandboxpool.ErrRateLimited, RetryAfter: 1500 * time.Millisecond}), http.StatusTooManyRequests, "rate_limited", "2"},
		{wrap(sandboxpool.ErrQuotaExceeded), http.StatusTooManyRequests, "quota_exceeded", ""},
		{wrap(context.DeadlineExceeded), http.StatusGatewayTimeout, "timeout", ""},
		{wrap(sandboxpool.ErrClosed), http.StatusServiceUnavailable, "shutting_down", ""},
		{wrap(fmt.Errorf("%w: create: %w", sandboxpool.ErrClosed, context.Canceled)), http.StatusServiceUnavailable, "shutting_down", ""},
		{wrap(fmt.Errorf("%w: lost twice", sandboxpool.ErrUnavailable)), http.StatusServiceUnavailable, "redis_unavailable", ""},
		{wrap(&e2b.APIError{Op: "create", StatusCode: http.StatusTooManyRequests, RetryAfter: 3 * time.Second}), http.StatusTooManyRequests, "provider_rate_limited", "3"},
		{wrap(&e2b.APIError{Op: "create", StatusCode: http.StatusTooManyRequests, RetryAfter: math.MaxInt64}), http.StatusTooManyRequests, "provider_rate_limited", "9223372037"},
		{wrap(&e2b.APIError{Op: "connect", SandboxID: "i1", StatusCode: http.StatusBadGateway}), http.StatusServiceUnavailable, "provider_unavailable", ""},
		{wrap(fmt.Errorf("e2b: connect i1: %w", e2b.ErrUnreachable)), http.StatusServiceUnavailable, "provider_unavailable", ""},
		{wrap(&sandboxpool.RetryAfterError{Err: fmt.Errorf("envd: %w (%w)", sandboxpool.ErrSandboxUnresponsive, e2b.ErrUnreachable), RetryAfter: 42 * time.Second}),
			http.StatusServiceUnavailable, "sandbox_unresponsive", "42"},
		{wrap(errors.New("a bug")), http.StatusInternalServerError, "internal", ""},
	} {
		rec := httptest.NewRecorder()
		writeError(rec, httptest.NewRequest(http.MethodPost, "/v1/users/u/projects/p/sandbox", nil), slog.New(slog.NewTextHandler(io.Discard, nil)), c.err)
		var body map[string]string
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body), "%v", c.err)
		assert.Equal(t, c.status, rec.Code, "%v", c.err)
		assert.Equal(t, c.code, body["error"], "%v", c.err)
		assert.Equal(t, c.retryAfter, rec.Header().Get("Retry-After"), "%v", c.err)
	}
}

// A client that hung up is not a failure of the service: it is logged at
// Info, not as an error, and gets a 499 it will never read. A cancellation
// while the client is still there (a fill cut short by Close) is not
// mistaken for it.
func TestClientGoneIsNotLoggedAsAnError(t *testing.T) {
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, nil))
	err := fmt.Errorf("sandboxpool: acquire: %w", context.Canceled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rec := httptest.NewRecorder()
	writeError(rec, httptest.NewRequest(http.MethodPost, "/v1/users/u/projects/p/sandbox", nil).WithContext(ctx), log, err)
	assert.Equal(t, statusClientClosed, rec.Code)
	assert.Contains(t, logs.String(), "level=INFO")
	assert.NotContains(t, logs.String(), "level=ERROR")

	rec = httptest.NewRecorder()
	writeError(rec, httptest.NewRequest(http.MethodPost, "/v1/users/u/projects/p/sandbox", nil), log, err)
	assert.NotEqual(t, statusClientClosed, rec.Code, "the client is still there")
}
