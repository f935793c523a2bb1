package sandboxpool

import (
	"context"
	"errors"
	"time"

	"github.com/sandboxpool/sandboxpool/e2b"
)

// EnvdPort is the port E2B's in-sandbox daemon (envd) listens on.
const EnvdPort = 49983

// Provider creates and manages sandboxes. The E2B provider (NewE2BProvider)
// implements it; tests may pass a fake.
//
// Implementations must be safe for concurrent use, must honour ctx, and must
// return an error wrapping ErrSandboxNotFound only when the provider says
// definitively that the sandbox does not exist or is not running. Every other
// failure (timeouts, 5xx, 429, auth) must be returned as something else: the
// Manager replaces a cached sandbox only on ErrSandboxNotFound, or on
// ErrSandboxUnresponsive (see Check) once it has lasted UnresponsiveAfter.
//
// A Provider may also have a CloseIdleConnections() method, which
// Manager.Close calls last (NewE2BProvider's closes its HTTP client's idle
// connections).
type Provider interface {
	// Create starts a new sandbox with req.Timeout as its provider-side
	// deadline and req.Metadata attached, and returns it with its ID. A
	// Sandbox without an ID is taken as a create whose outcome is unknown:
	// the Manager looks for the sandbox by metadata before it creates again.
	Create(ctx context.Context, req CreateRequest) (Sandbox, error)
	// Connect attaches to an existing sandbox, resuming it if paused, and
	// sets its provider-side deadline to at least now+timeout. The Sandbox
	// returned may leave ID empty (it is id); naming another sandbox is an
	// error, and the Manager keeps the one it asked for.
	Connect(ctx context.Context, id string, timeout time.Duration) (Sandbox, error)
	// Check reports whether sb is alive without changing its deadline. It
	// returns an error wrapping ErrSandboxNotFound when sb is gone, and one
	// wrapping ErrSandboxUnresponsive when the provider reports sb running
	// but sb itself answers that it is not there. A Check that gets no
	// answer at all must return neither: the Manager kills a sandbox that
	// stays unresponsive (Config.UnresponsiveAfter), and a network fault on
	// the caller's side says nothing about the sandbox.
	Check(ctx context.Context, sb Sandbox) error
	// SetTimeout sets the sandbox's provider-side deadline to now+timeout.
	SetTimeout(ctx context.Context, id string, timeout time.Duration) error
	// Kill destroys the sandbox. It returns nil when the sandbox is already gone.
	Kill(ctx context.Context, id string) error
	// List returns the sandboxes (running or paused) whose metadata contains
	// every key/value pair of metadata. The Manager ignores any without an
	// ID, and any whose Metadata, when reported, does not contain them.
	List(ctx context.Context, metadata map[string]string) ([]Sandbox, error)
}

// outcomeUnknown reports a create error after which a sandbox may exist: E2B
// got the request and its answer was lost, or a provider's answer did not
// name the sandbox.
func outcomeUnknown(err error) bool {
	return errors.Is(err, e2b.ErrOutcomeUnknown) || errors.Is(err, errNoSandboxID)
}

// CreateRequest describes a sandbox to create.
type CreateRequest struct {
	// Template is the provider's template id or alias.
	Template string
	// Timeout is the provider-side lifetime; the provider kills the sandbox
	// (or pauses it) when it passes without being extended.
	Timeout time.Duration
	// Metadata is attached to the sandbox and can be used to List it.
	Metadata map[string]string
}

// Sandbox describes one sandbox. It is a plain value: copying it is safe and
// printing it never reveals AccessToken.
type Sandbox struct {
	ID          string
	User        string
	Project     string
	Template    string
	Domain      string
	EnvdVersion string
	// AccessToken authenticates requests to envd (header X-Access-Token).
	// It is masked in every output form.
	AccessToken Secret
	// Metadata is the sandbox's provider metadata, as Provider.List
	// reports it. A Lease's Sandbox does not carry it: the Manager sets the
	// sandboxpool.* keys and Config.Metadata on every sandbox it creates.
	Metadata map[string]string
	// CreatedAt is when the sandbox started. The Manager reads it from
	// List (adopting a sandbox, it judges MaxAge by it) and ignores it in
	// Create's answer: a sandbox it creates is timed by its own clock.
	CreatedAt time.Time

	envdURL string // set by a provider whose envd is elsewhere (E2B_SANDBOX_URL)
}

// EnvdURL is the base URL of the sandbox's envd daemon:
// https://49983-<id>.<domain>, unless the provider routes envd elsewhere
// (e2b.Options.SandboxURL).
func (s Sandbox) EnvdURL() string {
	if s.envdURL != "" {
		return s.envdURL
	}
	return s.defaultEnvdURL()
}

func (s Sandbox) defaultEnvdURL() string {
	return "https://" + itoa(EnvdPort) + "-" + s.ID + "." + s.Domain
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// Metadata keys the Manager sets on every sandbox it creates, so that a pair's
// sandbox can be found (adopted) after Redis data loss and orphans can be swept.
const (
	MetaNamespace = "sandboxpool.ns"
	MetaUser      = "sandboxpool.user"
	MetaProject   = "sandboxpool.project"
)
