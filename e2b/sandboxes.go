package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/sandboxpool/sandboxpool/internal/e2bapi"
)

// listPageSize is the largest page E2B serves.
const listPageSize = 100

// maxListPages bounds one List: 1,000 pages are 100,000 sandboxes, far more
// than one metadata filter (one pair, or one namespace) matches on a team's
// concurrency limit. A server that keeps handing out new page tokens beyond
// it is answered with an error rather than followed until ctx ends.
const maxListPages = 1000

// State is a sandbox's lifecycle state.
type State string

// The states E2B reports.
const (
	StateRunning State = "running"
	StatePaused  State = "paused"
)

// Sandbox is what E2B reports about a sandbox. Fields a given call does not
// return are zero (create and connect return no times, state or metadata).
type Sandbox struct {
	ID          string
	TemplateID  string
	Alias       string
	Domain      string // base domain of envd traffic; the client's when E2B gives none
	EnvdVersion string
	// EnvdAccessToken authenticates envd requests (X-Access-Token); masked
	// in every output form.
	EnvdAccessToken Secret
	State           State
	StartedAt       time.Time
	EndAt           time.Time
	Metadata        map[string]string
}

// CreateParams describes a sandbox to create.
type CreateParams struct {
	Template string            // template id or alias; required
	Timeout  time.Duration     // lifetime; default Options.DefaultTimeout; sent in whole seconds, rounded up
	Metadata map[string]string // attached to the sandbox; List filters on it
	EnvVars  map[string]string
	// AutoPause pauses instead of killing the sandbox at its deadline.
	AutoPause bool
	// DenyInternetAccess turns off outbound internet access.
	DenyInternetAccess bool
}

func (c *Client) fromAPI(s e2bapi.Sandbox) Sandbox {
	sb := Sandbox{ID: s.SandboxID, TemplateID: s.TemplateID, EnvdVersion: s.EnvdVersion, Domain: c.domain}
	if s.Alias != nil {
		sb.Alias = *s.Alias
	}
	if s.Domain != nil && *s.Domain != "" {
		sb.Domain = *s.Domain
	}
	if s.EnvdAccessToken != nil {
		sb.EnvdAccessToken = NewSecret(*s.EnvdAccessToken)
	}
	return sb
}

// Create starts a sandbox. It always sends an explicit timeout. A 429 is
// retried; a failure after the request may have reached E2B is not, and
// matches ErrOutcomeUnknown: list by metadata before creating again.
func (c *Client) Create(ctx context.Context, p CreateParams) (Sandbox, error) {
	if p.Template == "" {
		return Sandbox{}, fmt.Errorf("e2b: create: template is required")
	}
	timeout := p.Timeout
	if timeout <= 0 {
		timeout = c.defTimeout
	}
	secs, secure, internet := seconds(timeout), true, !p.DenyInternetAccess
	body := e2bapi.NewSandbox{TemplateID: p.Template, Timeout: &secs, Secure: &secure, AllowInternetAccess: &internet}
	if p.AutoPause {
		body.AutoPause = &p.AutoPause
	}
	if len(p.Metadata) > 0 {
		md := e2bapi.SandboxMetadata(maps.Clone(p.Metadata))
		body.Metadata = &md
	}
	if len(p.EnvVars) > 0 {
		ev := e2bapi.EnvVars(maps.Clone(p.EnvVars))
		body.EnvVars = &ev
	}
	_, raw, err := c.do(ctx, call{op: "create", ok: []int{http.StatusCreated}}, func(ctx context.Context) (*http.Response, error) {
		return c.api.PostSandboxes(ctx, body)
	})
	if err != nil {
		return Sandbox{}, err
	}
	var out e2bapi.Sandbox
	if err := jsonUnmarshal(raw, &out); err != nil {
		return Sandbox{}, &unknownOutcome{err: fmt.Errorf("e2b: create: decoding response: %w", err)}
	}
	if out.SandboxID == "" { // created, perhaps, but nothing to name it by; the body may hold a token, so it is not quoted
		return Sandbox{}, &unknownOutcome{err: errors.New("e2b: create: the answer names no sandbox")}
	}
	return c.fromAPI(out), nil
}

// Connect attaches to a sandbox, resuming it if paused, and extends its
// deadline to at least now+timeout (E2B never shortens it on connect).
func (c *Client) Connect(ctx context.Context, id string, timeout time.Duration) (Sandbox, error) {
	if timeout <= 0 {
		timeout = c.defTimeout
	}
	body := e2bapi.ConnectSandbox{Timeout: seconds(timeout)}
	// A 409 says the sandbox is changing state (being paused, snapshotted or
	// killed): retried, it resumes, or comes back 404 once it is gone.
	_, raw, err := c.do(ctx, call{op: "connect", sandboxID: id, idempotent: true, retryConflict: true, ok: []int{http.StatusOK, http.StatusCreated}},
		func(ctx context.Context) (*http.Response, error) {
			return c.api.PostSandboxesSandboxIDConnect(ctx, id, body)
		})
	if err != nil {
		return Sandbox{}, err
	}
	var out e2bapi.Sandbox
	if err := jsonUnmarshal(raw, &out); err != nil {
		return Sandbox{}, fmt.Errorf("e2b: connect %s: decoding response: %w", id, err)
	}
	sb := c.fromAPI(out)
	sb.State = StateRunning
	return sb, nil
}

// Get describes a running or paused sandbox. It has no side effects.
func (c *Client) Get(ctx context.Context, id string) (Sandbox, error) {
	_, raw, err := c.do(ctx, call{op: "get", sandboxID: id, idempotent: true, ok: []int{http.StatusOK}},
		func(ctx context.Context) (*http.Response, error) { return c.api.GetSandboxesSandboxID(ctx, id) })
	if err != nil {
		return Sandbox{}, err
	}
	var d e2bapi.SandboxDetail
	if err := jsonUnmarshal(raw, &d); err != nil {
		return Sandbox{}, fmt.Errorf("e2b: get %s: decoding response: %w", id, err)
	}
	sb := c.fromAPI(e2bapi.Sandbox{SandboxID: d.SandboxID, TemplateID: d.TemplateID, Alias: d.Alias, EnvdVersion: d.EnvdVersion, EnvdAccessToken: d.EnvdAccessToken, Domain: d.Domain})
	sb.State, sb.StartedAt, sb.EndAt = State(d.State), d.StartedAt, d.EndAt
	if d.Metadata != nil {
		sb.Metadata = map[string]string(*d.Metadata)
	}
	return sb, nil
}

// List returns every sandbox, running or paused, whose metadata contains all
// the given pairs, following E2B's pages (X-Next-Token). Listed sandboxes
// carry no envd access token. E2B applies the filter; List checks each
// sandbox listed against it again, so that a server that did not (an API
// change, a proxy that dropped the query) cannot list a caller sandboxes
// that are not its own.
func (c *Client) List(ctx context.Context, metadata map[string]string) ([]Sandbox, error) {
	params := e2bapi.GetV2SandboxesParams{State: &[]e2bapi.SandboxState{e2bapi.Running, e2bapi.Paused}}
	limit := int32(listPageSize)
	params.Limit = &limit
	if len(metadata) > 0 {
		q := EncodeMetadataQuery(metadata)
		params.Metadata = &q
	}
	var out []Sandbox
	seen := map[string]bool{} // page tokens already followed
	for {
		resp, raw, err := c.do(ctx, call{op: "list", idempotent: true, ok: []int{http.StatusOK}},
			func(ctx context.Context) (*http.Response, error) { return c.api.GetV2Sandboxes(ctx, &params) })
		if err != nil {
			return nil, err
		}
		var page []e2bapi.ListedSandbox
		if err := jsonUnmarshal(raw, &page); err != nil {
			return nil, fmt.Errorf("e2b: list: decoding response: %w", err)
		}
		for _, l := range page {
			sb := Sandbox{ID: l.SandboxID, TemplateID: l.TemplateID, EnvdVersion: l.EnvdVersion, Domain: c.domain,
				State: State(l.State), StartedAt: l.StartedAt, EndAt: l.EndAt}
			if l.Alias != nil {
				sb.Alias = *l.Alias
			}
			if l.Metadata != nil {
				sb.Metadata = map[string]string(*l.Metadata)
			}
			if !MetadataMatches(sb.Metadata, metadata) {
				continue
			}
			out = append(out, sb)
		}
		next := resp.Header.Get("X-Next-Token")
		if next == "" {
			return out, nil
		}
		if len(seen)+1 >= maxListPages {
			return nil, fmt.Errorf("e2b: list: more than %d pages", maxListPages)
		}
		if seen[next] {
			// A server that hands back a token it gave before would be
			// followed, and its pages gathered, until ctx ends.
			return nil, fmt.Errorf("e2b: list: page %d: the server repeated an earlier page token", len(seen)+1)
		}
		seen[next] = true
		params.NextToken = &next
	}
}

// MetadataMatches reports whether a sandbox's metadata md matches the
// List filter filter as E2B matches it: every pair present, with the same
// value (so a sandbox without metadata matches only an empty filter). List
// applies it again to what E2B answers; fakes filter with it.
func MetadataMatches(md, filter map[string]string) bool {
	for k, v := range filter {
		if got, ok := md[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// EncodeMetadataQuery builds the metadata filter of GET /v2/sandboxes as E2B
// decodes it: the server URL-decodes the parameter, then the whole string
// again, splits on & and =, and decodes each key and value once more. So
// each key and value is escaped twice here (the HTTP layer adds the third).
func EncodeMetadataQuery(md map[string]string) string {
	keys := slices.Sorted(maps.Keys(md))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = url.QueryEscape(url.QueryEscape(k)) + "=" + url.QueryEscape(url.QueryEscape(md[k]))
	}
	return strings.Join(parts, "&")
}

// DecodeMetadataQuery is the server side of EncodeMetadataQuery (for fakes):
// it takes the once-decoded parameter value.
func DecodeMetadataQuery(q string) (map[string]string, error) {
	whole, err := url.QueryUnescape(q)
	if err != nil {
		return nil, err
	}
	md := map[string]string{}
	for _, part := range strings.Split(whole, "&") {
		kv := strings.Split(part, "=")
		if len(kv) != 2 {
			return nil, fmt.Errorf("metadata pair %q is not key=value", part)
		}
		k, err := url.QueryUnescape(kv[0])
		if err != nil {
			return nil, err
		}
		v, err := url.QueryUnescape(kv[1])
		if err != nil {
			return nil, err
		}
		md[k] = v
	}
	return md, nil
}

// Kill destroys a sandbox (running or paused). A sandbox already gone is
// not an error.
func (c *Client) Kill(ctx context.Context, id string) error {
	_, _, err := c.do(ctx, call{op: "kill", sandboxID: id, idempotent: true, ok: []int{http.StatusNoContent, http.StatusNotFound}},
		func(ctx context.Context) (*http.Response, error) { return c.api.DeleteSandboxesSandboxID(ctx, id) })
	return err
}

// SetTimeout makes the sandbox expire timeout from now; it may shorten the
// deadline. A paused sandbox is not found here. A 409 says the sandbox is
// not running (being paused or killed): retried, it runs again, or comes
// back 404 once it is gone.
func (c *Client) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	body := e2bapi.SandboxTimeoutRequest{Timeout: seconds(timeout)}
	_, _, err := c.do(ctx, call{op: "set timeout", sandboxID: id, idempotent: true, retryConflict: true, ok: []int{http.StatusNoContent}},
		func(ctx context.Context) (*http.Response, error) {
			return c.api.PostSandboxesSandboxIDTimeout(ctx, id, body)
		})
	return err
}

// Pause pauses a running sandbox. It reports false, with no error, when the
// sandbox was already paused.
func (c *Client) Pause(ctx context.Context, id string) (bool, error) {
	_, _, err := c.do(ctx, call{op: "pause", sandboxID: id, idempotent: true, ok: []int{http.StatusNoContent}},
		func(ctx context.Context) (*http.Response, error) {
			return c.api.PostSandboxesSandboxIDPause(ctx, id, e2bapi.SandboxPauseRequest{})
		})
	var ae *APIError
	if errAs(err, &ae) && ae.StatusCode == http.StatusConflict {
		return false, nil
	}
	return err == nil, err
}

// EnvdURL is the base URL of a sandbox's envd: Options.SandboxURL when set,
// else https://49983-<id>.<domain>.
func (c *Client) EnvdURL(sb Sandbox) string {
	if c.sandboxURL != "" {
		return c.sandboxURL
	}
	domain := sb.Domain
	if domain == "" {
		domain = c.domain
	}
	return fmt.Sprintf("https://%d-%s.%s", EnvdPort, sb.ID, domain)
}

// Healthy asks the sandbox's envd whether it is up (GET /health). It never
// changes the sandbox's deadline. It reports false with no error when the
// E2B proxy answers 502 (its "sandbox not found"); other failures are
// errors, since they do not say the sandbox is gone.
func (c *Client) Healthy(ctx context.Context, sb Sandbox) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.EnvdURL(sb)+"/health", nil)
	if err != nil {
		return false, fmt.Errorf("e2b: envd health %s: %w", sb.ID, err)
	}
	req.Header.Set("E2b-Sandbox-Id", sb.ID)
	req.Header.Set("E2b-Sandbox-Port", fmt.Sprint(EnvdPort))
	req.Header.Set("User-Agent", c.userAgent)
	if !sb.EnvdAccessToken.IsZero() {
		req.Header.Set("X-Access-Token", sb.EnvdAccessToken.Reveal())
	}
	resp, _, err := c.do(ctx, call{op: "envd health", sandboxID: sb.ID, idempotent: true, envd: true, token: sb.EnvdAccessToken, ok: []int{http.StatusOK, http.StatusNoContent, http.StatusBadGateway}},
		func(ctx context.Context) (*http.Response, error) { return c.http.Do(req.Clone(ctx)) })
	if err != nil {
		return false, err
	}
	return resp.StatusCode != http.StatusBadGateway, nil
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
