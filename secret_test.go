package sandboxpool_test

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/sandboxpool/sandboxpool"
)

const canary = "e2b_c0ffee0123456789abcdef0123456789abcdef"

func TestSecretMaskedEverywhere(t *testing.T) {
	s := sandboxpool.NewSecret(canary)
	sb := sandboxpool.Sandbox{ID: "i1", AccessToken: s}
	ptr := &sb
	var outs []string
	for _, verb := range []string{"%s", "%v", "%+v", "%#v", "%q", "%x", "%X", "%d", "%T %v", "%10s", "%-8q"} {
		outs = append(outs, fmt.Sprintf(verb, s), fmt.Sprintf(verb, sb), fmt.Sprintf(verb, ptr), fmt.Sprintf(verb, []sandboxpool.Secret{s}), fmt.Sprintf(verb, map[string]sandboxpool.Secret{"k": s}))
	}
	outs = append(outs, fmt.Sprint(s), fmt.Sprintln(sb), s.String(), s.GoString())

	j, err := json.Marshal(map[string]any{"s": s, "sb": sb, "m": map[sandboxpool.Secret]int{s: 1}})
	assert.NoError(t, err)
	outs = append(outs, string(j))
	type wrap struct {
		XMLName xml.Name `xml:"w"`
		S       sandboxpool.Secret
		A       sandboxpool.Secret `xml:"a,attr"`
	}
	x, err := xml.Marshal(wrap{S: s, A: s})
	assert.NoError(t, err)
	outs = append(outs, string(x))

	var logs bytes.Buffer
	for _, h := range []slog.Handler{slog.NewTextHandler(&logs, nil), slog.NewJSONHandler(&logs, nil)} {
		l := slog.New(h)
		l.Info("msg", "secret", s, "sandbox", sb, "ptr", ptr)
		l.Info("msg", slog.Any("s", s), slog.String("str", s.String()))
	}
	outs = append(outs, logs.String())

	for _, out := range outs {
		assert.NotContains(t, out, canary)
		assert.NotContains(t, out, "c0ffee")
	}
	assert.Contains(t, string(j), "[REDACTED]")
	assert.Equal(t, canary, s.Reveal())
	assert.Equal(t, "", sandboxpool.NewSecret("").String(), "an empty secret shows as empty")
}
