// Package e2b is a small, idiomatic client for E2B's sandbox lifecycle REST
// API (create, connect, describe, list by metadata, set timeout, pause,
// kill) and envd's health endpoint. It knows nothing of pools; E2B has no
// official Go SDK, and this package is usable on its own.
//
// The client authenticates with X-API-Key, always sends an explicit sandbox
// timeout (E2B's own default is 15 s), retries rate limits and transient
// failures with exponential backoff and jitter (honouring Retry-After and the
// context) while a retry quota shared by its calls allows (so an E2B
// incident meets each call once, not MaxRetries+1 times), never retries a
// create whose outcome is unknown (it returns ErrOutcomeUnknown instead),
// and never shows the API key or envd tokens in errors or fmt output.
package e2b

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/cenkalti/backoff/v5"

	"github.com/sandboxpool/sandboxpool/internal/e2bapi"
	"github.com/sandboxpool/sandboxpool/internal/secret"
)

// Version is this client's version, sent in the User-Agent.
const Version = "0.1.0"

// Defaults, documented on the Options fields they fill.
const (
	DefaultDomain         = "e2b.app"
	DefaultSandboxTimeout = 300 * time.Second // the official SDKs' default
	DefaultRequestTimeout = 60 * time.Second  // the official SDKs' default
	DefaultMaxRetries     = 3
	DefaultMinBackoff     = 200 * time.Millisecond
	DefaultMaxBackoff     = 5 * time.Second
	DefaultMaxRetryWait   = 30 * time.Second
	// EnvdPort is the port of envd, the daemon inside every sandbox.
	EnvdPort = 49983
)

// DefaultMaxIdleConnsPerHost is how many idle connections to the API the
// default HTTP client keeps. net/http keeps 2 per host: a burst of calls
// wider than that (a sandboxpool reaper tick alone makes up to 16 at once,
// and every Acquire that misses memory makes one) closes the rest when it
// ends, and the next burst dials and handshakes TLS again for each.
const DefaultMaxIdleConnsPerHost = 64

// newTransport is the default client's transport: net/http's
// DefaultTransport settings, with DefaultMaxIdleConnsPerHost. It is the
// Client's own, so CloseIdleConnections closes no one else's connections.
func newTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   DefaultMaxIdleConnsPerHost,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// refuseRedirect makes a Client's HTTP client return a redirect as the
// answer: net/http would send the request again, to whatever host the 3xx
// names, with every header but Authorization and Cookie, so with the API
// key (X-API-Key) and envd's access token (X-Access-Token). E2B's API and
// envd never redirect; a 3xx comes back as an *APIError.
func refuseRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// maxErrorBody bounds how much of an error response is read.
const maxErrorBody = 64 << 10

// maxResponseBody bounds how much of a successful response is read: a list
// page of 100 sandboxes with generous metadata is well under it, and a
// longer answer is errResponseTooLong, not a truncated body that fails to
// decode.
const maxResponseBody = 16 << 20

// errResponseTooLong is a successful answer longer than maxResponseBody. It
// is an answer, so it is neither retried nor ErrUnreachable.
var errResponseTooLong = fmt.Errorf("response longer than %d bytes", maxResponseBody)

// Secret is a masked credential; it is the same type as sandboxpool.Secret.
type Secret = secret.Secret

// NewSecret wraps a credential.
func NewSecret(v string) Secret { return secret.New(v) }

// Options configures a Client.
type Options struct {
	// APIKey authenticates every API call (header X-API-Key). Required.
	// sandboxpool.ConfigFromEnv reads it from E2B_API_KEY.
	APIKey Secret
	// Domain is E2B's base domain. default: "e2b.app" (E2B_DOMAIN).
	Domain string
	// BaseURL is the API's URL. default: "https://api." + Domain (E2B_API_URL).
	BaseURL string
	// SandboxURL, when set, is the envd base URL of every sandbox, as with
	// the SDKs' E2B_SANDBOX_URL; requests then carry E2b-Sandbox-Id so a
	// proxy (or a fake) can route them. default: https://49983-<id>.<domain>.
	SandboxURL string
	// HTTPClient sends every request. default: a client of the Client's
	// own with a 60 s timeout, net/http's default transport settings, and up
	// to DefaultMaxIdleConnsPerHost idle connections kept (net/http's
	// default keeps 2). Either way the Client follows no redirect (its copy
	// of the client's settings refuses them; yours is not changed): a 3xx
	// is returned as an *APIError, so the API key never goes to a host the
	// redirect names.
	HTTPClient *http.Client
	// DefaultTimeout is the sandbox lifetime sent on create when the caller
	// gives none. default: 300 s.
	DefaultTimeout time.Duration
	// MaxRetries bounds retries of one call (429, 502, 503, 504, transport
	// errors). default: 3; -1 disables retries.
	MaxRetries int
	// MinBackoff and MaxBackoff bound the exponential backoff between
	// retries (with jitter). defaults: 200 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
	// RetryQuota bounds the retries of all the Client's calls together
	// while they keep failing, in tokens: a retry after an error answer
	// takes 5, one after no answer 10, and a call that succeeds puts back 1
	// (what its retries took, if it had any). A retry the quota cannot pay
	// for is not sent, though its backoff is waited as if it were (so a
	// caller that loops on errors is not made to loop faster), and the
	// call's error says so. Rationing starts when over about 40% of tries
	// fail: with tries failing independently at 45%, 14% of calls fail
	// where 4% would with every retry sent; at 50%, 37% where 6% would.
	// API calls and envd health checks have a quota each, so sandboxes
	// whose envd hangs do not spend the API's. default: 500, the AWS SDKs'
	// standard retry mode (100 retries of error answers in a row); -1: no
	// quota, every call makes its MaxRetries. New refuses a quota below 10,
	// which could not pay for a retry after no answer.
	RetryQuota int
	// MaxRetryWait is the longest Retry-After the client waits out; a
	// longer one is returned to the caller (APIError.RetryAfter) at once.
	// The caller's context deadline also bounds every wait. default: 30 s.
	MaxRetryWait time.Duration
	// UserAgent is appended to the client's User-Agent.
	UserAgent string
}

// Client talks to E2B. It is safe for concurrent use.
type Client struct {
	api        *e2bapi.Client
	apiKey     Secret
	http       *http.Client
	domain     string
	baseURL    string
	sandboxURL string
	userAgent  string
	defTimeout time.Duration
	maxRetries int
	minBackoff time.Duration
	maxBackoff time.Duration
	maxWait    time.Duration
	// quotas bound the retries of API calls and of envd health checks
	// (see Options.RetryQuota).
	apiQuota, envdQuota *retryQuota
	jitter              float64 // the backoff's randomization factor; tests set 0
	// Counters for Stats.
	requests, retries, retriesUnsent atomic.Int64
}

// Stats is a snapshot of a Client's requests and retries.
type Stats struct {
	Requests        int64 // counter: requests made, first tries and retries, to the API and to envd
	Retries         int64 // counter: retries sent
	RetriesUnsent   int64 // counter: retries the retry quota could not pay for (not sent; their waits kept)
	RetryTokensAPI  int64 // gauge: tokens left in the API calls' retry quota (0 without a quota)
	RetryTokensEnvd int64 // gauge: tokens left in the envd health checks' retry quota
}

// Stats returns a snapshot of the Client's counters and retry quotas.
func (c *Client) Stats() Stats {
	return Stats{Requests: c.requests.Load(), Retries: c.retries.Load(), RetriesUnsent: c.retriesUnsent.Load(),
		RetryTokensAPI: int64(c.apiQuota.left()), RetryTokensEnvd: int64(c.envdQuota.left())}
}

// New validates opts and returns a Client.
func New(opts Options) (*Client, error) {
	if opts.APIKey.IsZero() {
		return nil, errors.New("e2b: Options.APIKey is required")
	}
	// net/http refuses to send a header value with a control character,
	// and each call would then fail before sending: a create as "outcome
	// unknown", anything else as ErrUnreachable after its retries, where the
	// fault is the configuration. A key has no space either.
	if strings.ContainsFunc(opts.APIKey.Reveal(), func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) {
		return nil, errors.New("e2b: Options.APIKey holds a space or a control character (a newline read from a file with it?); the key is not shown")
	}
	if strings.ContainsFunc(opts.UserAgent, unicode.IsControl) {
		return nil, fmt.Errorf("e2b: Options.UserAgent %q holds a control character", opts.UserAgent)
	}
	if opts.Domain == "" {
		opts.Domain = DefaultDomain
	}
	if opts.BaseURL == "" {
		opts.BaseURL = "https://api." + opts.Domain
	}
	for name, u := range map[string]string{"BaseURL": opts.BaseURL, "SandboxURL": opts.SandboxURL} {
		if u == "" {
			continue
		}
		pu, err := url.Parse(u)
		switch {
		case err != nil:
			// Not quoted: a URL that does not parse may still hold a password.
			return nil, fmt.Errorf("e2b: Options.%s is not a URL", name)
		case pu.Scheme != "http" && pu.Scheme != "https" || pu.Host == "":
			return nil, fmt.Errorf("e2b: Options.%s %q is not an http(s) URL", name, pu.Redacted())
		case pu.User != nil:
			// E2B authenticates with the API key; credentials in the URL
			// would show wherever the URL is printed (a proxy's belong in
			// HTTPS_PROXY, which net/http sends as Proxy-Authorization).
			return nil, fmt.Errorf("e2b: Options.%s %q carries credentials; E2B takes the API key only", name, pu.Redacted())
		}
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Timeout: DefaultRequestTimeout, Transport: newTransport()}
	}
	hc := *opts.HTTPClient // a copy, so the caller's client is left as it was
	hc.CheckRedirect = refuseRedirect
	opts.HTTPClient = &hc
	if opts.DefaultTimeout == 0 {
		opts.DefaultTimeout = DefaultSandboxTimeout
	}
	switch {
	case opts.MaxRetries == 0:
		opts.MaxRetries = DefaultMaxRetries
	case opts.MaxRetries < 0:
		opts.MaxRetries = 0
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	if opts.MaxRetryWait <= 0 {
		opts.MaxRetryWait = DefaultMaxRetryWait
	}
	switch {
	case opts.RetryQuota == 0:
		opts.RetryQuota = DefaultRetryQuota
	case opts.RetryQuota < 0:
		opts.RetryQuota = 0
	case opts.RetryQuota < retryNoAnswerCost:
		return nil, fmt.Errorf("e2b: Options.RetryQuota %d could never pay for a retry after no answer (%d tokens): use -1 for no quota", opts.RetryQuota, retryNoAnswerCost)
	}
	if opts.DefaultTimeout < 0 || opts.MaxBackoff < opts.MinBackoff {
		return nil, errors.New("e2b: DefaultTimeout must not be negative and MaxBackoff must be >= MinBackoff")
	}
	c := &Client{
		apiKey: opts.APIKey, http: opts.HTTPClient, domain: opts.Domain,
		baseURL: strings.TrimRight(opts.BaseURL, "/"), sandboxURL: strings.TrimRight(opts.SandboxURL, "/"),
		userAgent:  strings.TrimSpace("sandboxpool-e2b/" + Version + " " + opts.UserAgent),
		defTimeout: opts.DefaultTimeout, maxRetries: opts.MaxRetries,
		minBackoff: opts.MinBackoff, maxBackoff: opts.MaxBackoff, maxWait: opts.MaxRetryWait,
		apiQuota: newRetryQuota(opts.RetryQuota), envdQuota: newRetryQuota(opts.RetryQuota),
		jitter: backoff.DefaultRandomizationFactor,
	}
	api, err := e2bapi.NewClient(c.baseURL, e2bapi.WithHTTPClient(opts.HTTPClient),
		e2bapi.WithRequestEditorFn(func(_ context.Context, req *http.Request) error {
			req.Header.Set("X-API-Key", c.apiKey.Reveal())
			req.Header.Set("User-Agent", c.userAgent)
			return nil
		}))
	if err != nil {
		return nil, fmt.Errorf("e2b: %w", err)
	}
	c.api = api
	return c, nil
}

// String describes the client without its credentials.
func (c *Client) String() string { return "e2b.Client{" + c.baseURL + "}" }

// Format prints the client without its credentials, whatever the verb.
func (c *Client) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, c.String()) }

// Domain is the client's E2B domain.
func (c *Client) Domain() string { return c.domain }

// call is one logical API operation.
type call struct {
	op        string
	sandboxID string
	// idempotent calls are retried after any transient failure; others
	// (create) only when the request certainly did not take effect.
	idempotent bool
	// retryConflict retries a 409 as a transient answer: the sandbox is
	// between states.
	retryConflict bool
	envd          bool   // a call to a sandbox's envd, not to the API: see Options.RetryQuota
	token         Secret // envd's access token, which the call sends: scrubbed from error answers, as the API key is
	ok            []int  // success statuses
}

// do runs send with retries and returns the successful response, body read.
//
// A retry the quota cannot pay for is not sent, but its wait is still
// waited: the call keeps its backoff schedule, sending again at a later step
// if calls that succeed meanwhile have put tokens back, and fails no sooner
// than it would have with every retry sent. Failing at once instead made
// callers that try again on an error (a handler's client, a worker loop)
// call again at once: in a 15-second E2B outage phase of the soak, E2B got
// 47,000 requests where every retry sent made 23,000, and retries rationed
// as here make 10,400, with as many calls failed.
func (c *Client) do(ctx context.Context, cl call, send func(context.Context) (*http.Response, error)) (*http.Response, []byte, error) {
	q := c.apiQuota
	if cl.envd {
		q = c.envdQuota
	}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.RandomizationFactor = c.minBackoff, c.maxBackoff, c.jitter
	bo.Reset()
	var err error
	cost, spent, unpaid := 0, 0, 0 // the next retry's cost, the tokens this call's retries took, retries not sent
	for attempt := 0; ; attempt++ {
		if attempt > 0 && !q.take(cost) {
			unpaid++ // err stands
			c.retriesUnsent.Add(1)
		} else {
			if attempt > 0 {
				c.retries.Add(1)
			}
			spent += cost
			resp, body, e := c.once(ctx, cl, send)
			if e == nil {
				q.succeeded(spent)
				return resp, body, nil
			}
			err = e
		}
		retry, wait := c.classify(cl, err, bo)
		if !retry || attempt >= c.maxRetries || wait > c.maxWait {
			return nil, nil, c.final(cl, err, unpaid)
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			return nil, nil, c.final(cl, err, unpaid) // waiting would outlive the caller
		}
		cost = retryCost
		if !errAs(err, new(*APIError)) {
			cost = retryNoAnswerCost
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, nil, fmt.Errorf("%w (gave up waiting to retry: %w)", c.final(cl, err, unpaid), context.Cause(ctx))
		}
	}
}

// once sends one request and turns a non-success answer into an *APIError.
// A failure before any of the request was written is marked (see unsent).
func (c *Client) once(ctx context.Context, cl call, send func(context.Context) (*http.Response, error)) (*http.Response, []byte, error) {
	c.requests.Add(1)
	var wrote atomic.Bool
	resp, err := send(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteHeaderField: func(string, []string) { wrote.Store(true) },
	}))
	if err != nil {
		if !wrote.Load() {
			err = &unsent{err}
		}
		return nil, nil, err
	}
	defer resp.Body.Close()
	if !slices.Contains(cl.ok, resp.StatusCode) {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return nil, nil, c.apiError(cl, resp, body)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody+1))
	switch {
	case err != nil:
		return nil, nil, fmt.Errorf("reading response: %w", err)
	case len(body) > maxResponseBody:
		return nil, nil, errResponseTooLong
	}
	return resp, body, nil
}

// settled reports an error that is neither an API answer nor a transport
// failure: the caller's context ended, or the answer was too long. It is
// not retried, and not ErrUnreachable.
func settled(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, errResponseTooLong)
}

// classify says whether err is worth retrying and after how long.
func (c *Client) classify(cl call, err error, bo *backoff.ExponentialBackOff) (bool, time.Duration) {
	var ae *APIError
	switch {
	case errors.As(err, &ae):
		if !ae.Temporary() && !(cl.retryConflict && ae.StatusCode == http.StatusConflict) {
			return false, 0
		}
		// A 429 is a refusal: nothing happened, so even a create may be
		// retried. Other 5xx on a create leave its outcome unknown.
		if !cl.idempotent && ae.StatusCode != http.StatusTooManyRequests {
			return false, 0
		}
		if ae.RetryAfter > 0 {
			return true, ae.RetryAfter
		}
	case settled(err), badCertificate(err):
		return false, 0
	case notSent(err):
		// Nothing of the request was written: safe for any call.
	case !cl.idempotent:
		return false, 0
	}
	return true, bo.NextBackOff()
}

// unsent marks a transport error met before any of the request was
// written: net/http had not written a header field (the trace's first
// hook on the way out, for HTTP/1 and HTTP/2 alike). That covers every way
// to fail first (a dial, a proxy that cannot be dialled or refuses the
// CONNECT, a TLS handshake, a header net/http will not send) without
// naming the error types each produces, some of which are untyped (a
// refused CONNECT is errors.New of its status text).
type unsent struct{ err error }

func (u *unsent) Error() string { return u.err.Error() }
func (u *unsent) Unwrap() error { return u.err }

// notSent reports an error met before the request was written, so that
// retrying cannot duplicate it (see unsent).
func notSent(err error) bool {
	var u *unsent
	return errors.As(err, &u)
}

// badCertificate reports a server certificate the client refused (an
// unknown authority, a name that does not match): a configuration fault,
// such as a TLS-intercepting proxy whose CA is not trusted, that no retry
// mends.
func badCertificate(err error) bool {
	var cv *tls.CertificateVerificationError
	return errors.As(err, &cv)
}

// final wraps the last error of a call with its operation, marking one that
// got no answer (ErrUnreachable), a create whose outcome is unknown, and
// retries the quota did not let it send.
func (c *Client) final(cl call, err error, unpaid int) error {
	err = c.finalErr(cl, err)
	if unpaid > 0 {
		err = fmt.Errorf("%w (%d of its retries not sent: the client's retry quota is spent, as calls keep failing)", err, unpaid)
	}
	return err
}

// finalErr is final without the note on unpaid retries.
func (c *Client) finalErr(cl call, err error) error {
	var ae *APIError
	switch {
	case errors.As(err, &ae):
	case settled(err):
		err = fmt.Errorf("e2b: %s: %w", opName(cl.op, cl.sandboxID), err)
	default:
		err = &transportError{op: cl.op, sandboxID: cl.sandboxID, err: err}
	}
	if !cl.idempotent && !notSent(err) {
		if ae == nil || (ae.StatusCode >= 500 && ae.StatusCode != http.StatusNotImplemented) {
			return &unknownOutcome{err: err}
		}
	}
	return err
}

func (c *Client) apiError(cl call, resp *http.Response, body []byte) *APIError {
	ae := &APIError{Op: cl.op, SandboxID: cl.sandboxID, StatusCode: resp.StatusCode, RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"))}
	var eb e2bapi.Error
	if jsonUnmarshal(body, &eb) == nil {
		ae.Code, ae.Message = int(eb.Code), eb.Message
		if eb.ErrorCode != nil {
			ae.ErrorCode = *eb.ErrorCode
		}
	} else if len(body) > 0 { // the edge's 429 is not JSON
		ae.Message = strings.TrimSpace(string(body[:min(len(body), 512)]))
	}
	for _, k := range []string{c.apiKey.Reveal(), cl.token.Reveal()} {
		if k != "" {
			ae.Message = strings.ReplaceAll(ae.Message, k, "[REDACTED]")
			ae.ErrorCode = strings.ReplaceAll(ae.ErrorCode, k, "[REDACTED]")
		}
	}
	return ae
}

// parseRetryAfter reads delay-seconds or an HTTP date. It never returns a
// negative duration: a number of seconds too large for a Duration is read
// as the most whole seconds one holds, which exceeds any MaxRetryWait, so
// the call returns at once; it used to wrap around instead (a fuzz test
// found "9223372037" read as minus 292 years, and retried with backoff).
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		if s > uint64(math.MaxInt64/time.Second) {
			return math.MaxInt64 / time.Second * time.Second // whole seconds, as sent
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(0, time.Until(t))
	}
	return 0
}

// seconds converts a duration to E2B's whole seconds, rounding up so a
// deadline is never earlier than asked.
func seconds(d time.Duration) int32 {
	if d <= 0 {
		return 0
	}
	s := math.Ceil(d.Seconds())
	return int32(min(s, math.MaxInt32))
}

// CloseIdleConnections closes the HTTP client's idle keep-alive
// connections (for shutdown, and tests that check for leaked goroutines).
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }
