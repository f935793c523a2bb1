package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sandboxpool/sandboxpool/e2b"
)

// Environment variables that configure the E2B provider (the names E2B's
// own SDKs read).
const (
	EnvE2BAPIKey     = "E2B_API_KEY"
	EnvE2BAPIURL     = "E2B_API_URL"
	EnvE2BDomain     = "E2B_DOMAIN"
	EnvE2BSandboxURL = "E2B_SANDBOX_URL"
)

// NewE2BProvider adapts an E2B client to Provider. A definitive not-found
// from E2B (a 404 naming the sandbox, or envd down with the API confirming
// the sandbox gone or paused) becomes ErrSandboxNotFound; every other error
// is returned as is.
func NewE2BProvider(c *e2b.Client) Provider { return &e2bProvider{c: c} }

type e2bProvider struct{ c *e2b.Client }

func (p *e2bProvider) toSandbox(sb e2b.Sandbox) Sandbox {
	out := Sandbox{ID: sb.ID, Template: sb.TemplateID, Domain: sb.Domain, EnvdVersion: sb.EnvdVersion,
		AccessToken: sb.EnvdAccessToken, Metadata: sb.Metadata, CreatedAt: sb.StartedAt}
	if u := p.c.EnvdURL(sb); u != out.defaultEnvdURL() {
		out.envdURL = u
	}
	return out
}

func (p *e2bProvider) Create(ctx context.Context, req CreateRequest) (Sandbox, error) {
	sb, err := p.c.Create(ctx, e2b.CreateParams{Template: req.Template, Timeout: req.Timeout, Metadata: req.Metadata})
	if err != nil {
		return Sandbox{}, err
	}
	return p.toSandbox(sb), nil
}

func (p *e2bProvider) Connect(ctx context.Context, id string, timeout time.Duration) (Sandbox, error) {
	sb, err := p.c.Connect(ctx, id, timeout)
	if err != nil {
		return Sandbox{}, mapNotFound(err)
	}
	return p.toSandbox(sb), nil
}

// Check asks envd (no side effect on the deadline). When envd's proxy
// answers that the sandbox is not there (502), the API's detail decides:
// gone or paused is ErrSandboxNotFound; running is ErrSandboxUnresponsive
// (also matching e2b.ErrUnreachable), which the Manager fails closed on
// until Config.UnresponsiveAfter. envd giving no answer at all is returned
// as is.
func (p *e2bProvider) Check(ctx context.Context, sb Sandbox) error {
	ok, err := p.c.Healthy(ctx, e2b.Sandbox{ID: sb.ID, Domain: sb.Domain, EnvdAccessToken: sb.AccessToken})
	if err != nil || ok {
		return err
	}
	d, err := p.c.Get(ctx, sb.ID)
	switch {
	case err != nil:
		return mapNotFound(err)
	case d.State == e2b.StatePaused:
		return fmt.Errorf("e2b: sandbox %s is paused: %w", sb.ID, ErrSandboxNotFound)
	case d.State == e2b.StateRunning:
		return fmt.Errorf("envd of sandbox %s, which the API reports running: %w (%w)", sb.ID, ErrSandboxUnresponsive, e2b.ErrUnreachable)
	default:
		return fmt.Errorf("envd of sandbox %s, which the API reports %s: %w", sb.ID, d.State, e2b.ErrUnreachable)
	}
}

func (p *e2bProvider) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	return mapNotFound(p.c.SetTimeout(ctx, id, timeout))
}

func (p *e2bProvider) Kill(ctx context.Context, id string) error { return p.c.Kill(ctx, id) }

// CloseIdleConnections closes the E2B client's idle connections (see
// Manager.Close).
func (p *e2bProvider) CloseIdleConnections() { p.c.CloseIdleConnections() }

func (p *e2bProvider) List(ctx context.Context, metadata map[string]string) ([]Sandbox, error) {
	found, err := p.c.List(ctx, metadata)
	if err != nil {
		return nil, err
	}
	out := make([]Sandbox, len(found))
	for i, sb := range found {
		out[i] = p.toSandbox(sb)
	}
	return out, nil
}

func mapNotFound(err error) error {
	if err != nil && errors.Is(err, e2b.ErrNotFound) {
		return fmt.Errorf("%w: %w", ErrSandboxNotFound, err)
	}
	return err
}

// e2bFromEnv builds the E2B provider when E2B_API_KEY is set.
func e2bFromEnv(env envSource, c *Config) error {
	key, ok := env(EnvE2BAPIKey)
	if !ok || key == "" {
		for _, name := range []string{EnvE2BAPIURL, EnvE2BDomain, EnvE2BSandboxURL} {
			if v, set := env(name); set && v != "" {
				return fmt.Errorf("%s is set but %s is not", name, EnvE2BAPIKey)
			}
		}
		return nil
	}
	opts := e2b.Options{APIKey: e2b.NewSecret(key)}
	opts.BaseURL, _ = env(EnvE2BAPIURL)
	opts.Domain, _ = env(EnvE2BDomain)
	opts.SandboxURL, _ = env(EnvE2BSandboxURL)
	client, err := e2b.New(opts)
	if err != nil {
		return fmt.Errorf("E2B_*: %w", err)
	}
	c.Provider = NewE2BProvider(client)
	return nil
}

func init() { envHooks = append(envHooks, e2bFromEnv) }
