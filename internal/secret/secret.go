// Package secret holds the masked credential type shared by sandboxpool and
// its e2b client (sandboxpool.Secret and e2b.Secret are aliases of it).
package secret

import (
	"fmt"
	"log/slog"
)

const redacted = "[REDACTED]"

// Secret holds a credential (an API key, an envd access token). Every output
// form masks it: fmt with any verb, slog, JSON (values and map keys), XML and
// text marshalling. It is a struct holding a pointer, not a string type, so
// no conversion can read it by accident, and even a printer that cannot call
// its methods (fmt on an unexported field) shows an address, not the value.
// Call Reveal where the value must be sent. The zero value is empty.
type Secret struct{ p *string }

// New wraps a credential.
func New(v string) Secret {
	if v == "" {
		return Secret{}
	}
	return Secret{&v}
}

// Reveal returns the secret's value. Call it only where the value is sent.
func (s Secret) Reveal() string {
	if s.p == nil {
		return ""
	}
	return *s.p
}

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.p == nil }

// Equal reports whether two secrets hold the same value.
func (s Secret) Equal(o Secret) bool { return s.Reveal() == o.Reveal() }

// String returns a mask, never the value.
func (s Secret) String() string { return s.mask() }

// GoString returns a mask, never the value.
func (s Secret) GoString() string { return s.mask() }

// Format masks the value for every fmt verb, %#v and %q included.
func (s Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(s.mask())) }

// LogValue masks the value in slog output.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.mask()) }

// MarshalJSON masks the value in JSON.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + s.mask() + `"`), nil }

// MarshalText masks the value in text encodings (and JSON map keys).
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.mask()), nil }

func (s Secret) mask() string {
	if s.p == nil {
		return ""
	}
	return redacted
}
