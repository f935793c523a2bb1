package e2b_test

// The contract test: every request our client sends and every response our
// fake returns is validated against E2B's published OpenAPI document
// (../shared/e2b/openapi.yml beside the repository, never copied into it),
// and envd's health call against envd's published document. Our own subset
// (internal/e2bapi/openapi.yml) is checked to be a faithful subset of it.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

// sharedSpec loads a published spec from ../shared/e2b. Locally a missing
// ../shared skips with a message; in CI (CI=true) it fails.
func sharedSpec(t *testing.T, name string) *openapi3.T {
	t.Helper()
	path, err := filepath.Abs(filepath.Join("..", "..", "shared", "e2b", name))
	require.NoError(t, err)
	if _, err := os.Stat(path); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("published spec %s is missing: CI must run with ../shared beside the repository", path)
		}
		t.Skipf("published spec %s not found: clone the repository beside ../shared to run the contract test", path)
	}
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile(path)
	require.NoError(t, err, "loading %s", path)
	return doc
}

func routerFor(t *testing.T, doc *openapi3.T, base string) routers.Router {
	t.Helper()
	doc.Servers = openapi3.Servers{{URL: base}}
	r, err := gorillamux.NewRouter(doc)
	require.NoError(t, err)
	return r
}

// validatingTransport checks each exchange against the published specs.
type validatingTransport struct {
	t         *testing.T
	base      http.RoundTripper
	api, envd routers.Router
	envdHost  string
	mu        sync.Mutex
	seen      map[string]int // "METHOD /path/template STATUS" → count
	failures  []string
}

func (v *validatingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	router := v.api
	if req.URL.Host == v.envdHost {
		router = v.envd
	}
	var reqBody []byte
	if req.Body != nil {
		reqBody, _ = io.ReadAll(req.Body)
		_ = req.Body.Close()
	}
	reset := func() { req.Body, req.ContentLength = io.NopCloser(bytes.NewReader(reqBody)), int64(len(reqBody)) }
	reset()
	route, params, err := router.FindRoute(req)
	if err != nil {
		v.fail("no route in the published spec for %s %s: %v", req.Method, req.URL.Path, err)
		reset()
		return v.base.RoundTrip(req)
	}
	in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{MultiError: true, SkipSettingDefaults: true, AuthenticationFunc: authenticate}}
	if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
		v.fail("request %s %s violates the published spec: %v", req.Method, route.Path, err)
	}
	reset()
	resp, err := v.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	respBody, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(respBody))
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{MultiError: true}}
	out.SetBodyBytes(respBody)
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		v.fail("response %d to %s %s violates the published spec: %v\nbody: %s", resp.StatusCode, req.Method, route.Path, err, respBody)
	}
	v.mu.Lock()
	v.seen[fmt.Sprintf("%s %s %d", req.Method, route.Path, resp.StatusCode)]++
	v.mu.Unlock()
	return resp, nil
}

func (v *validatingTransport) fail(format string, args ...any) {
	v.mu.Lock()
	v.failures = append(v.failures, fmt.Sprintf(format, args...))
	v.mu.Unlock()
}

// authenticate accepts the ApiKeyAuth scheme when X-API-Key is present and
// refuses the others, so a request passes only through the scheme we use.
func authenticate(_ context.Context, in *openapi3filter.AuthenticationInput) error {
	if in.SecuritySchemeName == "ApiKeyAuth" && in.RequestValidationInput.Request.Header.Get("X-API-Key") != "" {
		return nil
	}
	return fmt.Errorf("scheme %s not used", in.SecuritySchemeName)
}

func TestContractAgainstPublishedSpec(t *testing.T) {
	apiDoc := sharedSpec(t, "openapi.yml")
	envdDoc := sharedSpec(t, "envd.openapi.yml")
	clk := &clock{t: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)}
	srv := e2btest.Start(e2btest.Config{Now: clk.Now, MaxConcurrent: 1000})
	defer srv.Close()
	envdURL, _ := url.Parse(srv.EnvdURL)
	vt := &validatingTransport{t: t, base: &http.Transport{}, envdHost: envdURL.Host, seen: map[string]int{},
		api: routerFor(t, apiDoc, srv.URL), envd: routerFor(t, envdDoc, srv.EnvdURL)}
	defer vt.base.(*http.Transport).CloseIdleConnections()
	opts := srv.ClientOptions()
	opts.HTTPClient = &http.Client{Transport: vt}
	c, err := e2b.New(opts)
	require.NoError(t, err)

	md := map[string]string{"sandboxpool.ns": "sandboxpool", "sandboxpool.user": "a+b@c.d", "sandboxpool.project": "p=1"}
	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base", Timeout: time.Minute, Metadata: md, EnvVars: map[string]string{"A": "1"}})
	require.NoError(t, err)
	for range 150 { // enough for two pages
		_, err := c.Create(ctx, e2b.CreateParams{Template: "base", Metadata: map[string]string{"k": "v"}})
		require.NoError(t, err)
		clk.Advance(time.Millisecond)
	}
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base", AutoPause: true, DenyInternetAccess: true})
	require.NoError(t, err)
	listed, err := c.List(ctx, md)
	require.NoError(t, err)
	require.Len(t, listed, 1)
	all, err := c.List(ctx, map[string]string{"k": "v"})
	require.NoError(t, err)
	require.Len(t, all, 150)
	_, err = c.Get(ctx, sb.ID)
	require.NoError(t, err)
	_, err = c.Get(ctx, "imissing")
	require.ErrorIs(t, err, e2b.ErrNotFound)
	ok, err := c.Healthy(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, c.SetTimeout(ctx, sb.ID, 2*time.Minute))
	require.ErrorIs(t, c.SetTimeout(ctx, "imissing", time.Minute), e2b.ErrNotFound)
	_, err = c.Connect(ctx, sb.ID, time.Minute) // running: 200
	require.NoError(t, err)
	paused, err := c.Pause(ctx, sb.ID)
	require.NoError(t, err)
	require.True(t, paused)
	paused, err = c.Pause(ctx, sb.ID) // 409
	require.NoError(t, err)
	require.False(t, paused)
	_, err = c.Connect(ctx, sb.ID, time.Minute) // paused: 201
	require.NoError(t, err)
	_, err = c.Connect(ctx, "imissing", time.Minute)
	require.ErrorIs(t, err, e2b.ErrNotFound)
	srv.Inject(e2btest.OpConnect, e2btest.Fault{Status: 503})
	_, err = c.Connect(ctx, sb.ID, time.Minute)
	require.NoError(t, err)
	srv.Inject(e2btest.OpCreate, e2btest.Fault{Status: 500, AfterEffect: true})
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.ErrorIs(t, err, e2b.ErrOutcomeUnknown)
	require.NoError(t, c.Kill(ctx, sb.ID))
	require.NoError(t, c.Kill(ctx, sb.ID)) // 404
	_, err = c.Get(ctx, "NOT-valid")
	require.Error(t, err)

	for _, f := range vt.failures {
		t.Error(f)
	}
	want := []string{
		"POST /sandboxes 201", "POST /sandboxes 500",
		"GET /v2/sandboxes 200",
		"GET /sandboxes/{sandboxID} 200", "GET /sandboxes/{sandboxID} 404",
		"POST /sandboxes/{sandboxID}/timeout 204", "POST /sandboxes/{sandboxID}/timeout 404",
		"POST /sandboxes/{sandboxID}/connect 200", "POST /sandboxes/{sandboxID}/connect 201",
		"POST /sandboxes/{sandboxID}/connect 404", "POST /sandboxes/{sandboxID}/connect 503",
		"POST /sandboxes/{sandboxID}/pause 204", "POST /sandboxes/{sandboxID}/pause 409",
		"DELETE /sandboxes/{sandboxID} 204", "DELETE /sandboxes/{sandboxID} 404",
		"GET /health 204",
	}
	for _, w := range want {
		assert.Positive(t, vt.seen[w], "exchange %q was not exercised", w)
	}
	keys := make([]string, 0, len(vt.seen))
	for k := range vt.seen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	t.Logf("validated exchanges: %s", strings.Join(keys, ", "))
}

// TestOwnSpecIsSubsetOfPublished: every operation, parameter and schema
// property of our generator input exists in the published document with
// the same type, so the generated client cannot drift from E2B.
func TestOwnSpecIsSubsetOfPublished(t *testing.T) {
	published := sharedSpec(t, "openapi.yml")
	ours, err := openapi3.NewLoader().LoadFromFile(filepath.Join("..", "internal", "e2bapi", "openapi.yml"))
	require.NoError(t, err)
	require.NoError(t, ours.Validate(context.Background()), "our spec is valid OpenAPI")
	for path, item := range ours.Paths.Map() {
		pub := published.Paths.Find(path)
		require.NotNil(t, pub, "path %s", path)
		for method, op := range item.Operations() {
			pop := pub.GetOperation(method)
			require.NotNil(t, pop, "%s %s", method, path)
			for _, p := range append(item.Parameters, op.Parameters...) {
				pp := findParam(append(pub.Parameters, pop.Parameters...), p.Value.Name, p.Value.In)
				require.NotNil(t, pp, "%s %s parameter %s", method, path, p.Value.Name)
				assert.Equal(t, typeOf(pp.Schema), typeOf(p.Value.Schema), "%s %s parameter %s", method, path, p.Value.Name)
			}
			if op.RequestBody != nil {
				require.NotNil(t, pop.RequestBody, "%s %s body", method, path)
				compareSchema(t, method+" "+path+" body", pop.RequestBody.Value.Content.Get("application/json").Schema, op.RequestBody.Value.Content.Get("application/json").Schema)
			}
			for code, r := range op.Responses.Map() {
				pr := pop.Responses.Value(code)
				if pr == nil {
					t.Logf("%s %s: status %s is ours only (the service produces it beyond its spec)", method, path, code)
					continue
				}
				if mt := r.Value.Content.Get("application/json"); mt != nil {
					compareSchema(t, fmt.Sprintf("%s %s %s", method, path, code), pr.Value.Content.Get("application/json").Schema, mt.Schema)
				}
			}
		}
	}
}

func findParam(ps openapi3.Parameters, name, in string) *openapi3.Parameter {
	for _, p := range ps {
		if p.Value.Name == name && p.Value.In == in {
			return p.Value
		}
	}
	return nil
}

func typeOf(s *openapi3.SchemaRef) string {
	if s == nil || s.Value == nil || s.Value.Type == nil {
		return ""
	}
	out := strings.Join(s.Value.Type.Slice(), ",")
	if s.Value.Items != nil {
		out += "[" + typeOf(s.Value.Items) + "]"
	}
	return out
}

// compareSchema checks ours ⊆ published: each property we declare exists
// there with the same type, and each property we require is required there.
func compareSchema(t *testing.T, where string, pub, ours *openapi3.SchemaRef) {
	t.Helper()
	require.NotNil(t, pub, where)
	if ours.Value.Items != nil {
		require.NotNil(t, pub.Value.Items, where)
		compareSchema(t, where+"[]", pub.Value.Items, ours.Value.Items)
		return
	}
	for name, prop := range ours.Value.Properties {
		pp, ok := pub.Value.Properties[name]
		if !assert.True(t, ok, "%s: property %s not in the published schema", where, name) {
			continue
		}
		if tp := typeOf(prop); tp != "" && typeOf(pp) != "" {
			assert.Equal(t, typeOf(pp), tp, "%s.%s", where, name)
		}
	}
	for _, r := range ours.Value.Required {
		assert.Contains(t, pub.Value.Required, r, "%s: we require %s, the published schema does not", where, r)
	}
}
