// Package e2btest is a fake E2B server over real HTTP, in the spirit of
// net/http/httptest, for testing code that uses E2B (through package e2b or
// sandboxpool) without reaching E2B.
//
// It serves the sandbox lifecycle endpoints (create, detail, list v2 with
// metadata filter and paging, kill, set timeout, connect, pause) with E2B's
// documented behaviour and error bodies, and envd's GET /health on a second
// listener routed by the E2b-Sandbox-Id header (set e2b.Options.SandboxURL
// to Server.EnvdURL). Sandboxes expire at their deadline on the server's
// clock (or pause, if created with autoPause). Faults can be injected per
// operation: status codes with Retry-After, latency, dropped connections,
// a create that succeeds but answers with an error, and a concurrency cap
// answering 429.
//
//	srv := e2btest.NewServer(t)        // closed by t.Cleanup
//	c, _ := e2b.New(srv.ClientOptions())
package e2btest

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxpool/sandboxpool/e2b"
)

// APIKey is the key the fake accepts unless Config.APIKey says otherwise.
const APIKey = "e2b_0123456789abcdef0123456789abcdef01234567"

// Op names an endpoint, for counters and fault injection.
type Op string

// The endpoints.
const (
	OpCreate  Op = "create"
	OpGet     Op = "get"
	OpList    Op = "list"
	OpKill    Op = "kill"
	OpTimeout Op = "timeout"
	OpConnect Op = "connect"
	OpPause   Op = "pause"
	OpHealth  Op = "envd health"
)

// Fault is an injected failure for one request.
type Fault struct {
	Status     int           // answer with this status and E2B's error body (0: no status fault)
	Message    string        // body message; default: the status text
	RetryAfter time.Duration // sets Retry-After (whole seconds)
	Latency    time.Duration // delay before handling (honours the request's context)
	Drop       bool          // close the connection without answering
	// AfterEffect performs the operation first, then answers with the
	// fault: the caller sees a failure although the sandbox was created,
	// killed, … (an "unknown outcome").
	AfterEffect bool
}

// Config configures a Server. The zero value is usable.
type Config struct {
	APIKey string           // accepted X-API-Key; default APIKey
	Now    func() time.Time // server clock; default time.Now
	// MaxConcurrent caps running sandboxes; creates and resumes beyond it
	// get E2B's 429. 0 = no cap.
	MaxConcurrent int
	// MaxTimeout is the longest timeout accepted. default: 1 hour (Hobby).
	MaxTimeout time.Duration
	// EnvdVersion reported for new sandboxes. default: "0.6.4".
	EnvdVersion string
}

type sandbox struct {
	id, template, alias string
	metadata, envVars   map[string]string
	startedAt, endAt    time.Time
	state               e2b.State
	autoPause           bool
	hung                bool // running, but its envd's proxy answers 502
	token               string
}

// Server is a running fake. Its methods are safe for concurrent use.
type Server struct {
	// URL is the API base URL (e2b.Options.BaseURL).
	URL string
	// EnvdURL is the envd base URL (e2b.Options.SandboxURL).
	EnvdURL string

	cfg        Config
	api, envd  *httptest.Server
	mu         sync.Mutex
	sandboxes  map[string]*sandbox
	faults     map[Op][]Fault
	calls      sync.Map // Op → *atomic.Int64
	requests   atomic.Int64
	lastHeader atomic.Pointer[http.Header]
	down       atomic.Pointer[Fault] // set by Down: every request's fault
	proxyDown  atomic.Bool           // set by ProxyDown: every sandbox hangs
}

// NewServer starts a fake with the zero Config and closes it at test end.
func NewServer(t testing.TB) *Server {
	s := Start(Config{})
	t.Cleanup(s.Close)
	return s
}

// Start starts a fake; call Close when done.
func Start(cfg Config) *Server {
	if cfg.APIKey == "" {
		cfg.APIKey = APIKey
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxTimeout == 0 {
		cfg.MaxTimeout = time.Hour
	}
	if cfg.EnvdVersion == "" {
		cfg.EnvdVersion = "0.6.4"
	}
	s := &Server{cfg: cfg, sandboxes: map[string]*sandbox{}, faults: map[Op][]Fault{}}
	api := http.NewServeMux()
	api.HandleFunc("POST /sandboxes", s.handle(OpCreate, s.create))
	api.HandleFunc("GET /v2/sandboxes", s.handle(OpList, s.list))
	api.HandleFunc("GET /sandboxes/{sandboxID}", s.handle(OpGet, s.get))
	api.HandleFunc("DELETE /sandboxes/{sandboxID}", s.handle(OpKill, s.kill))
	api.HandleFunc("POST /sandboxes/{sandboxID}/timeout", s.handle(OpTimeout, s.setTimeout))
	api.HandleFunc("POST /sandboxes/{sandboxID}/connect", s.handle(OpConnect, s.connect))
	api.HandleFunc("POST /sandboxes/{sandboxID}/pause", s.handle(OpPause, s.pause))
	s.api = httptest.NewServer(api)
	envd := http.NewServeMux()
	envd.HandleFunc("GET /health", s.handle(OpHealth, s.health))
	s.envd = httptest.NewServer(envd)
	s.URL, s.EnvdURL = s.api.URL, s.envd.URL
	return s
}

// Close shuts both listeners down.
func (s *Server) Close() {
	s.api.CloseClientConnections()
	s.envd.CloseClientConnections()
	s.api.Close()
	s.envd.Close()
}

// ClientOptions are e2b.Options pointing at this fake, with fast retries.
func (s *Server) ClientOptions() e2b.Options {
	return e2b.Options{APIKey: e2b.NewSecret(s.cfg.APIKey), BaseURL: s.URL, SandboxURL: s.EnvdURL,
		MinBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
}

// Inject queues faults for op; each is used by one request, in order.
func (s *Server) Inject(op Op, faults ...Fault) {
	s.mu.Lock()
	s.faults[op] = append(s.faults[op], faults...)
	s.mu.Unlock()
}

// Pending returns how many faults queued for op no request has met yet.
func (s *Server) Pending(op Op) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.faults[op])
}

// ClearFaults drops every fault Inject queued that no request has met.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	clear(s.faults)
	s.mu.Unlock()
}

// Down starts an outage: until Up, every request to the API and to envd
// that has no fault queued by Inject meets f (a 503, say, or a dropped
// connection), as in an E2B incident. Sandboxes keep running, and reach
// their deadlines, meanwhile.
func (s *Server) Down(f Fault) { s.down.Store(&f) }

// Up ends an outage Down started.
func (s *Server) Up() { s.down.Store(nil) }

// Calls returns how many requests reached op (faulted ones included).
func (s *Server) Calls(op Op) int64 {
	if v, ok := s.calls.Load(op); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

// Requests returns how many requests the fake has received in all.
func (s *Server) Requests() int64 { return s.requests.Load() }

// Running returns the ids of running sandboxes, sorted.
func (s *Server) Running() []string { return s.ids(e2b.StateRunning) }

// Paused returns the ids of paused sandboxes, sorted.
func (s *Server) Paused() []string { return s.ids(e2b.StatePaused) }

func (s *Server) ids(state e2b.State) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id := range s.sandboxes {
		if sb := s.liveLocked(id); sb != nil && sb.state == state {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// EndAt returns a sandbox's deadline and whether it exists.
func (s *Server) EndAt(id string) (time.Time, bool) {
	_, end, ok := s.times(id)
	return end, ok
}

// StartedAt returns when a sandbox was created, and whether it exists.
func (s *Server) StartedAt(id string) (time.Time, bool) {
	start, _, ok := s.times(id)
	return start, ok
}

func (s *Server) times(id string) (start, end time.Time, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sb := s.liveLocked(id); sb != nil {
		return sb.startedAt, sb.endAt, true
	}
	return time.Time{}, time.Time{}, false
}

// Metadata returns a sandbox's metadata.
func (s *Server) Metadata(id string) map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sb := s.liveLocked(id); sb != nil {
		return maps.Clone(sb.metadata)
	}
	return nil
}

// Vanish deletes a sandbox as if E2B lost it.
func (s *Server) Vanish(id string) {
	s.mu.Lock()
	delete(s.sandboxes, id)
	s.mu.Unlock()
}

// Hang makes a running sandbox's envd stop answering: its health check
// gets the proxy's 502 while the API still reports it running (and
// connects, extends and lists it), as for a sandbox whose VM hung.
func (s *Server) Hang(id string) {
	s.mu.Lock()
	if sb := s.liveLocked(id); sb != nil {
		sb.hung = true
	}
	s.mu.Unlock()
}

// ProxyDown makes every sandbox's envd stop answering, those created
// later too, as in an incident of E2B's sandbox proxy: each health check
// gets the proxy's 502 while the API reports the sandbox running (and
// connects, extends and lists it). ProxyUp ends it.
func (s *Server) ProxyDown() { s.proxyDown.Store(true) }

// ProxyUp ends what ProxyDown started: the sandboxes answer again, but for
// those Hang hung.
func (s *Server) ProxyUp() { s.proxyDown.Store(false) }

// PauseNow pauses a running sandbox as auto-pause would.
func (s *Server) PauseNow(id string) {
	s.mu.Lock()
	if sb := s.liveLocked(id); sb != nil && sb.state == e2b.StateRunning {
		sb.state, sb.endAt = e2b.StatePaused, s.cfg.Now()
	}
	s.mu.Unlock()
}

// LastHeader returns the headers of the most recent request.
func (s *Server) LastHeader() http.Header {
	if h := s.lastHeader.Load(); h != nil {
		return h.Clone()
	}
	return nil
}

// liveLocked applies expiry: at its deadline a running sandbox is killed,
// or paused if it was created with autoPause.
func (s *Server) liveLocked(id string) *sandbox {
	sb := s.sandboxes[id]
	if sb == nil || sb.state != e2b.StateRunning || s.cfg.Now().Before(sb.endAt) {
		return sb
	}
	if sb.autoPause {
		sb.state = e2b.StatePaused
		return sb
	}
	delete(s.sandboxes, id)
	return nil
}

func (s *Server) counter(op Op) *atomic.Int64 {
	v, _ := s.calls.LoadOrStore(op, new(atomic.Int64))
	return v.(*atomic.Int64)
}

func (s *Server) nextFault(op Op) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.faults[op]
	if len(q) == 0 {
		return Fault{}, false
	}
	s.faults[op] = q[1:]
	return q[0], true
}

// handle wraps an endpoint with counting, auth and fault injection.
func (s *Server) handle(op Op, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		s.counter(op).Add(1)
		hdr := r.Header.Clone()
		s.lastHeader.Store(&hdr)
		f, faulted := s.nextFault(op)
		if d := s.down.Load(); d != nil && !faulted {
			f, faulted = *d, true
		}
		if faulted && f.Latency > 0 {
			t := time.NewTimer(f.Latency)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		if op != OpHealth && r.Header.Get("X-API-Key") != s.cfg.APIKey {
			writeError(w, http.StatusUnauthorized, "Invalid API key", 0)
			return
		}
		if faulted && f.AfterEffect {
			h(discard{w.Header()}, r)
		}
		switch {
		case faulted && f.Drop:
			drop(w)
		case faulted && f.Status != 0:
			msg := f.Message
			if msg == "" {
				msg = http.StatusText(f.Status)
			}
			writeError(w, f.Status, msg, f.RetryAfter)
		case faulted && f.AfterEffect:
			w.WriteHeader(http.StatusOK) // AfterEffect with latency only
		default:
			h(w, r)
		}
	}
}

// drop closes the connection without an HTTP answer.
func drop(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			_ = conn.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// discard lets a handler run for its side effect only.
type discard struct{ h http.Header }

func (d discard) Header() http.Header         { return d.h.Clone() }
func (d discard) Write(b []byte) (int, error) { return len(b), nil }
func (d discard) WriteHeader(int)             {}

type errorBody struct {
	Code      int    `json:"code"`
	Message   string `json:"message"`
	ErrorCode string `json:"error_code,omitempty"`
}

func writeError(w http.ResponseWriter, status int, msg string, retryAfter time.Duration) {
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter.Round(time.Second)/time.Second)))
	}
	writeJSON(w, status, errorBody{Code: status, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

var idPattern = regexp.MustCompile(`^[a-z0-9]+$`)

// sandboxID validates the path id as E2B does (a legacy -suffix is dropped).
func sandboxID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id, _, _ := strings.Cut(r.PathValue("sandboxID"), "-")
	if !idPattern.MatchString(id) {
		writeError(w, http.StatusBadRequest, "Invalid sandbox ID", 0)
		return "", false
	}
	return id, true
}

// idAndTimeout reads the sandbox id of the path and the required timeout
// (seconds, 0 allowed) of the body of a connect or a timeout change, or
// answers the request's error.
func (s *Server) idAndTimeout(w http.ResponseWriter, r *http.Request) (string, time.Duration, bool) {
	id, ok := sandboxID(w, r)
	if !ok {
		return "", 0, false
	}
	var body struct {
		Timeout *int `json:"timeout"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.Timeout == nil {
		writeError(w, http.StatusBadRequest, "validation error: timeout is required", 0)
		return "", 0, false
	}
	d, ok := s.timeoutArg(w, *body.Timeout, false)
	return id, d, ok
}

func notFound(w http.ResponseWriter, id string) {
	writeError(w, http.StatusNotFound, fmt.Sprintf("Sandbox %q doesn't exist or you don't have access to it", id), 0)
}

const idAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

func newID() string {
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = idAlphabet[int(b[i])%len(idAlphabet)]
	}
	return "i" + string(b)
}

// runningLocked counts running sandboxes for the concurrency cap.
func (s *Server) runningLocked() int {
	n := 0
	for id := range s.sandboxes {
		if sb := s.liveLocked(id); sb != nil && sb.state == e2b.StateRunning {
			n++
		}
	}
	return n
}

func (s *Server) capReachedLocked(w http.ResponseWriter) bool {
	if s.cfg.MaxConcurrent > 0 && s.runningLocked() >= s.cfg.MaxConcurrent {
		writeError(w, http.StatusTooManyRequests, fmt.Sprintf("you have reached the maximum number of concurrent E2B sandboxes (%d). If you need more, please visit 'https://e2b.dev/docs/billing'", s.cfg.MaxConcurrent), 0)
		return true
	}
	return false
}

// timeoutArg validates a timeout in seconds; ok=false means an answer was sent.
func (s *Server) timeoutArg(w http.ResponseWriter, secs int, positive bool) (time.Duration, bool) {
	if positive && secs <= 0 {
		writeError(w, http.StatusBadRequest, "Timeout must be greater than 0", 0)
		return 0, false
	}
	d := time.Duration(max(secs, 0)) * time.Second
	if d > s.cfg.MaxTimeout {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("Timeout cannot be greater than %d hours", int(s.cfg.MaxTimeout.Hours())), 0)
		return 0, false
	}
	return d, true
}

type sandboxJSON struct {
	TemplateID      string  `json:"templateID"`
	SandboxID       string  `json:"sandboxID"`
	Alias           string  `json:"alias,omitempty"`
	ClientID        string  `json:"clientID"`
	EnvdVersion     string  `json:"envdVersion"`
	EnvdAccessToken string  `json:"envdAccessToken,omitempty"`
	Domain          *string `json:"domain"`
}

func (s *Server) sandboxJSON(sb *sandbox) sandboxJSON {
	return sandboxJSON{TemplateID: sb.template, SandboxID: sb.id, Alias: sb.alias, ClientID: "6532622b",
		EnvdVersion: s.cfg.EnvdVersion, EnvdAccessToken: sb.token}
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	var body struct {
		TemplateID string            `json:"templateID"`
		Timeout    *int              `json:"timeout"`
		AutoPause  bool              `json:"autoPause"`
		Secure     bool              `json:"secure"`
		Metadata   map[string]string `json:"metadata"`
		EnvVars    map[string]string `json:"envVars"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.TemplateID == "" {
		writeError(w, http.StatusBadRequest, "validation error: templateID is required", 0)
		return
	}
	secs := 15 // E2B's server default when timeout is omitted
	if body.Timeout != nil {
		secs = *body.Timeout
	}
	d, ok := s.timeoutArg(w, secs, true)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.capReachedLocked(w) {
		return
	}
	now := s.cfg.Now()
	sb := &sandbox{id: newID(), template: body.TemplateID, alias: body.TemplateID, metadata: body.Metadata, envVars: body.EnvVars,
		startedAt: now, endAt: now.Add(d), state: e2b.StateRunning, autoPause: body.AutoPause}
	if body.Secure {
		sb.token = "ea_" + newID()
	}
	s.sandboxes[sb.id] = sb
	writeJSON(w, http.StatusCreated, s.sandboxJSON(sb))
}

type detailJSON struct {
	TemplateID      string            `json:"templateID"`
	Alias           string            `json:"alias,omitempty"`
	SandboxID       string            `json:"sandboxID"`
	ClientID        string            `json:"clientID"`
	StartedAt       time.Time         `json:"startedAt"`
	EndAt           time.Time         `json:"endAt"`
	EnvdVersion     string            `json:"envdVersion"`
	EnvdAccessToken string            `json:"envdAccessToken,omitempty"`
	Domain          *string           `json:"domain,omitempty"`
	CPUCount        int               `json:"cpuCount"`
	MemoryMB        int               `json:"memoryMB"`
	DiskSizeMB      int               `json:"diskSizeMB"`
	Metadata        map[string]string `json:"metadata,omitempty"`
	State           e2b.State         `json:"state"`
}

func (s *Server) detail(sb *sandbox, withToken bool) detailJSON {
	d := detailJSON{TemplateID: sb.template, Alias: sb.alias, SandboxID: sb.id, ClientID: "6532622b",
		StartedAt: sb.startedAt.UTC(), EndAt: sb.endAt.UTC(), EnvdVersion: s.cfg.EnvdVersion,
		CPUCount: 2, MemoryMB: 512, DiskSizeMB: 512, Metadata: sb.metadata, State: sb.state}
	if withToken {
		d.EnvdAccessToken = sb.token
	}
	return d
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	id, ok := sandboxID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.liveLocked(id)
	if sb == nil {
		notFound(w, id)
		return
	}
	writeJSON(w, http.StatusOK, s.detail(sb, true))
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request) {
	id, ok := sandboxID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.liveLocked(id) == nil {
		notFound(w, id)
		return
	}
	delete(s.sandboxes, id)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request) {
	id, d, ok := s.idAndTimeout(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.liveLocked(id)
	if sb == nil || sb.state != e2b.StateRunning { // only live sandboxes are looked up
		notFound(w, id)
		return
	}
	sb.endAt = s.cfg.Now().Add(d) // may shorten
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) connect(w http.ResponseWriter, r *http.Request) {
	id, d, ok := s.idAndTimeout(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.liveLocked(id)
	if sb == nil {
		notFound(w, id)
		return
	}
	now := s.cfg.Now()
	if sb.state == e2b.StatePaused {
		if s.capReachedLocked(w) {
			return
		}
		sb.state, sb.endAt = e2b.StateRunning, now.Add(d)
		writeJSON(w, http.StatusCreated, s.sandboxJSON(sb))
		return
	}
	if end := now.Add(d); end.After(sb.endAt) { // connect only extends
		sb.endAt = end
	}
	writeJSON(w, http.StatusOK, s.sandboxJSON(sb))
}

func (s *Server) pause(w http.ResponseWriter, r *http.Request) {
	id, ok := sandboxID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.liveLocked(id)
	switch {
	case sb == nil:
		notFound(w, id)
	case sb.state == e2b.StatePaused:
		writeError(w, http.StatusConflict, fmt.Sprintf("Error pausing sandbox - sandbox '%s' is already paused", id), 0)
	default:
		sb.state, sb.endAt = e2b.StatePaused, s.cfg.Now()
		w.WriteHeader(http.StatusNoContent)
	}
}

// list serves GET /v2/sandboxes: metadata filter (decoded as E2B does),
// state filter, newest first (startedAt desc, then id asc), limit ≤ 100,
// and an opaque cursor in X-Next-Token.
func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var filter map[string]string
	if v := q.Get("metadata"); v != "" {
		md, err := e2b.DecodeMetadataQuery(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, "Error parsing metadata", 0)
			return
		}
		filter = md
	}
	states := map[e2b.State]bool{e2b.StateRunning: true, e2b.StatePaused: true}
	if v := q.Get("state"); v != "" {
		states = map[e2b.State]bool{}
		for _, st := range strings.Split(v, ",") {
			if st != string(e2b.StateRunning) && st != string(e2b.StatePaused) {
				writeError(w, http.StatusBadRequest, "validation error: invalid state", 0)
				return
			}
			states[e2b.State(st)] = true
		}
	}
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			writeError(w, http.StatusBadRequest, "validation error: invalid limit", 0)
			return
		}
		limit = min(n, 100)
	}
	var after *cursor
	if v := q.Get("nextToken"); v != "" {
		c, err := parseCursor(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, "Invalid next token", 0)
			return
		}
		after = &c
	}

	s.mu.Lock()
	var rows []*sandbox
	running := 0
	for id := range s.sandboxes {
		sb := s.liveLocked(id)
		if sb == nil || !states[sb.state] || !e2b.MetadataMatches(sb.metadata, filter) {
			continue
		}
		if sb.state == e2b.StateRunning {
			running++
		}
		rows = append(rows, sb)
	}
	slices.SortFunc(rows, func(a, b *sandbox) int {
		if c := b.startedAt.Compare(a.startedAt); c != 0 {
			return c
		}
		return strings.Compare(a.id, b.id)
	})
	if after != nil {
		i := slices.IndexFunc(rows, func(sb *sandbox) bool { return after.before(sb) })
		if i < 0 {
			i = len(rows)
		}
		rows = rows[i:]
	}
	page := make([]detailJSON, 0, min(limit, len(rows)))
	for _, sb := range rows[:min(limit, len(rows))] {
		page = append(page, s.detail(sb, false))
	}
	s.mu.Unlock()
	if len(rows) > limit {
		last := rows[limit-1]
		w.Header().Set("X-Next-Token", cursor{last.startedAt, last.id}.String())
	}
	if states[e2b.StateRunning] {
		w.Header().Set("X-Total-Running", strconv.Itoa(running))
	}
	writeJSON(w, http.StatusOK, page)
}

// cursor is E2B's page cursor: base64url("<RFC3339Nano>__<id>").
type cursor struct {
	t  time.Time
	id string
}

func (c cursor) String() string {
	return base64.URLEncoding.EncodeToString([]byte(c.t.UTC().Format(time.RFC3339Nano) + "__" + c.id))
}

func parseCursor(v string) (cursor, error) {
	raw, err := base64.URLEncoding.DecodeString(v)
	if err != nil {
		return cursor{}, err
	}
	ts, id, ok := strings.Cut(string(raw), "__")
	if !ok {
		return cursor{}, fmt.Errorf("bad cursor")
	}
	t, err := time.Parse(time.RFC3339Nano, ts)
	return cursor{t, id}, err
}

// before reports whether sb comes after the cursor row in desc order.
func (c cursor) before(sb *sandbox) bool {
	if !sb.startedAt.Equal(c.t) {
		return sb.startedAt.Before(c.t)
	}
	return sb.id > c.id
}

// health serves envd's GET /health, routed by E2b-Sandbox-Id: 204 for a
// running sandbox, else the proxy's 502.
func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	id := r.Header.Get("E2b-Sandbox-Id")
	s.mu.Lock()
	sb := s.liveLocked(id)
	alive := sb != nil && sb.state == e2b.StateRunning && !sb.hung && !s.proxyDown.Load()
	s.mu.Unlock()
	if !alive {
		writeJSON(w, http.StatusBadGateway, map[string]any{"sandboxId": id, "message": "The sandbox was not found", "code": 502})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
