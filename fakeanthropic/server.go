package fakeanthropic

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxBodyBytes is the request size limit of the API (32 MB); larger bodies
// get the CDN's 413.
const maxBodyBytes = 32 << 20

// Server is the fake Messages API. It is an http.Handler, safe for
// concurrent use.
type Server struct {
	cfg    Config
	now    func() time.Time
	logger *slog.Logger
	// pause blocks until due on the wall clock, or until ctx ends. Tests
	// replace it to step the output one token at a time.
	pause func(ctx context.Context, due time.Time) error

	mu     sync.Mutex // guards everything below and the groups' buckets
	groups []*groupState
	queue  []FaultRule
	rng    *mrand.Rand
	stats  statsState
	// cache maps a prompt prefix (breakpoint.key) to when it expires.
	cache        map[[sha256.Size]byte]time.Time
	cacheSweepAt int // sweep expired entries when the cache grows this big
	batches      batchState
	// batchOutage is the status every Message Batches request answers
	// (SetBatchOutage); 0 for none.
	batchOutage int
}

// New returns a Server for cfg, with defaults filled in (see Config). It
// reports every problem of cfg at once.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("fakeanthropic: invalid config: %w", err)
	}
	seed := uint64(cfg.Seed)
	if seed == 0 {
		seed = mrand.Uint64()
	}
	s := &Server{
		cfg:    cfg,
		now:    cfg.Clock,
		logger: cfg.Logger,
		pause:  sleepUntil,
		rng:    mrand.New(mrand.NewPCG(seed, 0x5eed)),
		stats:  newStatsState(cfg.Groups),
		cache:  map[[sha256.Size]byte]time.Time{},

		cacheSweepAt: cacheSweepMin,
	}
	now := s.now()
	for _, g := range cfg.Groups {
		s.groups = append(s.groups, newGroupState(g, now))
	}
	return s, nil
}

// ServeHTTP routes a request. This switch is the whole HTTP surface.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("request-id", "req_"+rand.Text())
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/v1/messages":
		s.handleMessages(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/v1/messages/count_tokens":
		s.handleCountTokens(w, r)
	case r.Method == http.MethodGet && r.URL.Path == "/_fake/stats":
		s.handleStats(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/_fake/reset":
		s.ResetStats()
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet && r.URL.Path == "/v1/organizations/rate_limits":
		s.handleRateLimits(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/_fake/faults":
		s.handleQueueFaults(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/_fake/cache/clear":
		writeJSON(w, http.StatusOK, map[string]int{"cleared": s.ClearCache()})
	case r.Method == http.MethodPost && r.URL.Path == "/_fake/limits":
		s.handleSetLimits(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/_fake/batches/outage":
		s.handleBatchOutage(w, r)
	case s.handleBatches(w, r):
	default:
		writeError(w, &apiError{status: http.StatusNotFound, typ: typeNotFound,
			message: fmt.Sprintf("Not found: %s %s", r.Method, r.URL.Path)})
	}
}

// requestKey is the x-api-key header, or else the Authorization: Bearer
// token; "" for none.
func requestKey(r *http.Request) string {
	key := r.Header.Get("x-api-key")
	if key == "" {
		if auth := r.Header.Get("Authorization"); len(auth) > len("Bearer ") && strings.EqualFold(auth[:7], "Bearer ") {
			key = strings.TrimSpace(auth[7:])
		}
	}
	return key
}

// oneOf reports whether key is one of keys, in constant time per key.
func oneOf(key string, keys []string) bool {
	ok := 0
	for _, k := range keys {
		ok |= subtle.ConstantTimeCompare([]byte(k), []byte(key))
	}
	return ok == 1
}

func missingKey() *apiError {
	return &apiError{status: http.StatusUnauthorized, typ: typeAuthentication, message: "x-api-key header is required"}
}

func invalidKey() *apiError {
	return &apiError{status: http.StatusUnauthorized, typ: typeAuthentication, message: "invalid x-api-key"}
}

// validAPIKey reports whether key is accepted by the Messages API.
func (s *Server) validAPIKey(key string) bool {
	return key != "" && (len(s.cfg.APIKeys) == 0 || oneOf(key, s.cfg.APIKeys))
}

// authenticate checks the x-api-key header, or else Authorization: Bearer.
func (s *Server) authenticate(r *http.Request) *apiError {
	key := requestKey(r)
	if key == "" {
		return missingKey()
	}
	if !s.validAPIKey(key) {
		return invalidKey()
	}
	return nil
}

// readRequest does what every API call does before its own work, in the
// API's order: size limit (tooLarge: the caller sends the CDN's 413),
// authentication, anthropic-version (any value), then the body.
func (s *Server) readRequest(w http.ResponseWriter, r *http.Request, countOnly bool) (req *messagesRequest, apiErr *apiError, tooLarge bool) {
	if r.ContentLength > maxBodyBytes {
		return nil, nil, true
	}
	if apiErr := s.authenticate(r); apiErr != nil {
		return nil, apiErr, false
	}
	if r.Header.Get("anthropic-version") == "" {
		return nil, invalidRequest("anthropic-version: header is required"), false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, nil, true
		}
		return nil, invalidRequest("There was an issue with your request body: it could not be read."), false
	}
	req, apiErr = parseRequest(body, countOnly)
	return req, apiErr, false
}

// groupFor returns the first group with a pattern matching model.
func (s *Server) groupFor(model string) *groupState {
	for _, g := range s.groups {
		for _, p := range g.Models {
			if ok, _ := path.Match(p, model); ok {
				return g
			}
		}
	}
	return nil
}

func modelNotFound(model string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: typeNotFound, message: "model: " + model}
}

// handleCountTokens answers POST /v1/messages/count_tokens: free, but
// limited by its own requests bucket per group.
func (s *Server) handleCountTokens(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.stats.CountTokensRequests++
	s.mu.Unlock()

	req, apiErr, tooLarge := s.readRequest(w, r, true)
	switch {
	case tooLarge:
		writeTooLarge(w)
		return
	case apiErr != nil:
		writeError(w, apiErr)
		return
	}
	g := s.groupFor(req.model)
	if g == nil {
		writeError(w, modelNotFound(req.model))
		return
	}
	now := s.now()
	s.mu.Lock()
	g.refill(now)
	fits := g.counts.has(1)
	if fits {
		g.counts.take(1)
	}
	st, wait, rpm := g.counts.state(now, true), g.counts.secondsUntil(1), g.RPM
	s.mu.Unlock()
	writeLimit(w.Header(), "requests", st)
	if !fits {
		writeError(w, rateLimited(commas(rpm)+" count_tokens requests", wait))
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"input_tokens": req.inputTokens})
}

// handleStats answers GET /_fake/stats with Stats as JSON. ?log=N keeps only
// the last N log records (log=0: none).
func (s *Server) handleStats(w http.ResponseWriter, r *http.Request) {
	st := s.Stats()
	if v := r.URL.Query().Get("log"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeError(w, invalidRequest("log: want a non-negative integer, got %q", v))
			return
		}
		if n < len(st.Log) {
			st.Log = st.Log[len(st.Log)-n:]
		}
	}
	writeJSON(w, http.StatusOK, st)
}

// faultsRequest is the body of POST /_fake/faults.
type faultsRequest struct {
	Faults []struct {
		Kind              FaultKind `json:"kind"`
		RetryAfterSeconds float64   `json:"retry_after_seconds"`
	} `json:"faults"`
}

// handleQueueFaults answers POST /_fake/faults: the same as QueueFaults.
func (s *Server) handleQueueFaults(w http.ResponseWriter, r *http.Request) {
	var body faultsRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		writeError(w, invalidRequest("body: want {\"faults\":[{\"kind\":\"overloaded\",\"retry_after_seconds\":2}]}: %v", err))
		return
	}
	rules := make([]FaultRule, 0, len(body.Faults))
	for i, f := range body.Faults {
		rule := FaultRule{Kind: f.Kind, RetryAfter: time.Duration(f.RetryAfterSeconds * float64(time.Second))}
		if err := rule.validate(); err != nil {
			writeError(w, invalidRequest("faults.%d: %v", i, err))
			return
		}
		rules = append(rules, rule)
	}
	s.QueueFaults(rules...)
	s.mu.Lock()
	queued := len(s.queue)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]int{"queued": queued})
}

// sleepUntil waits on the wall clock until due, or until ctx ends.
func sleepUntil(ctx context.Context, due time.Time) error {
	d := time.Until(due)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
