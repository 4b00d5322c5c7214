package fakeanthropic

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The Message Batches API: POST /v1/messages/batches creates a batch of
// Messages requests; GET …/{id} tells its processing status and counts;
// GET …/{id}/results streams its results as JSON Lines once it ended;
// POST …/{id}/cancel cancels what is not processed; DELETE …/{id} removes
// an ended batch; GET /v1/messages/batches lists them, newest first.
//
// A batch's requests are answered as the Messages API would answer them
// (the same reply plan, usage and cache pricing), but they do not touch the
// Messages rate-limit buckets: batches have limits of their own, of which
// the fake models the processing queue (Config.BatchQueueLimit requests
// waiting in batches not ended). A batch ends Config.BatchDelay after its
// creation; a canceled one at once, its requests canceled.
//
// SetBatchOutage (POST /_fake/batches/outage) makes the whole Batches API
// answer one error status until it is ended; SetBatchDelay changes
// Config.BatchDelay for the batches created afterwards.

// maxBatchRequests is the API's cap on requests in one batch.
const maxBatchRequests = 100000

// batchTTL is how long a batch may process before it expires (24 h).
const batchTTL = 24 * time.Hour

var customIDRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// batch is one Message Batch.
type batch struct {
	id                string
	created, endsAt   time.Time
	canceledAt        time.Time // zero unless canceled
	results           []batchResult
	deleted, archived bool
}

// batchResult is one request's outcome, decided when the batch is created
// and revealed when it ends.
type batchResult struct {
	customID string
	result   json.RawMessage // the "result" object of its results line
	kind     string          // succeeded or errored
}

// batchState is the Server's batches.
type batchState struct {
	byID  map[string]*batch
	order []*batch // by creation
}

// batchRequestCounts is a batch's request_counts.
type batchRequestCounts struct {
	Processing int `json:"processing"`
	Succeeded  int `json:"succeeded"`
	Errored    int `json:"errored"`
	Canceled   int `json:"canceled"`
	Expired    int `json:"expired"`
}

// batchObject is a MessageBatch on the wire.
type batchObject struct {
	ID                string             `json:"id"`
	Type              string             `json:"type"`
	ProcessingStatus  string             `json:"processing_status"`
	RequestCounts     batchRequestCounts `json:"request_counts"`
	EndedAt           *string            `json:"ended_at"`
	CreatedAt         string             `json:"created_at"`
	ExpiresAt         string             `json:"expires_at"`
	ArchivedAt        *string            `json:"archived_at"`
	CancelInitiatedAt *string            `json:"cancel_initiated_at"`
	ResultsURL        *string            `json:"results_url"`
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// ended reports whether b has ended at now.
func (b *batch) ended(now time.Time) bool { return !now.Before(b.endsAt) }

// object is b as the API shows it at now; base is the URL the results
// are read from.
func (b *batch) object(now time.Time, base string) batchObject {
	o := batchObject{ID: b.id, Type: "message_batch", CreatedAt: rfc3339(b.created),
		ExpiresAt: rfc3339(b.created.Add(batchTTL)), ProcessingStatus: "in_progress"}
	if !b.canceledAt.IsZero() {
		c := rfc3339(b.canceledAt)
		o.CancelInitiatedAt = &c
		o.ProcessingStatus = "canceling"
	}
	if !b.ended(now) {
		o.RequestCounts.Processing = len(b.results)
		return o
	}
	o.ProcessingStatus = "ended"
	e := rfc3339(b.endsAt)
	o.EndedAt = &e
	u := base + "/v1/messages/batches/" + b.id + "/results"
	o.ResultsURL = &u
	if b.archived {
		o.ArchivedAt = &e
	}
	for _, r := range b.results {
		switch b.kindAt(r) {
		case "succeeded":
			o.RequestCounts.Succeeded++
		case "errored":
			o.RequestCounts.Errored++
		case "canceled":
			o.RequestCounts.Canceled++
		}
	}
	return o
}

// kindAt is r's outcome: canceled when its batch was canceled before it
// ended (the fake processes a batch's requests at its end).
func (b *batch) kindAt(r batchResult) string {
	if !b.canceledAt.IsZero() {
		return "canceled"
	}
	return r.kind
}

// handleBatches routes /v1/messages/batches…; it reports whether the path
// was one of them.
func (s *Server) handleBatches(w http.ResponseWriter, r *http.Request) bool {
	rest, ok := strings.CutPrefix(r.URL.Path, "/v1/messages/batches")
	if !ok || (rest != "" && !strings.HasPrefix(rest, "/")) {
		return false
	}
	s.mu.Lock()
	outage := s.batchOutage
	s.mu.Unlock()
	if outage != 0 {
		writeError(w, batchOutageError(outage))
		return true
	}
	if e := s.authenticate(r); e != nil {
		writeError(w, e)
		return true
	}
	if r.Header.Get("anthropic-version") == "" {
		writeError(w, invalidRequest("anthropic-version: header is required"))
		return true
	}
	parts := strings.Split(strings.Trim(rest, "/"), "/")
	switch {
	case rest == "" && r.Method == http.MethodPost:
		s.createBatch(w, r)
	case rest == "" && r.Method == http.MethodGet:
		s.listBatches(w, r)
	case len(parts) == 1 && r.Method == http.MethodGet:
		s.withBatch(w, parts[0], func(b *batch, now time.Time) { writeJSON(w, http.StatusOK, b.object(now, baseURL(r))) })
	case len(parts) == 1 && r.Method == http.MethodDelete:
		s.deleteBatch(w, parts[0])
	case len(parts) == 2 && parts[1] == "cancel" && r.Method == http.MethodPost:
		s.withBatch(w, parts[0], func(b *batch, now time.Time) {
			if !b.ended(now) && b.canceledAt.IsZero() {
				b.canceledAt = now
				o := b.object(now, baseURL(r)) // "canceling", as the API answers
				b.endsAt = now
				writeJSON(w, http.StatusOK, o)
				return
			}
			writeJSON(w, http.StatusOK, b.object(now, baseURL(r)))
		})
	case len(parts) == 2 && parts[1] == "results" && r.Method == http.MethodGet:
		s.batchResults(w, parts[0])
	default:
		writeError(w, &apiError{status: http.StatusNotFound, typ: typeNotFound,
			message: fmt.Sprintf("Not found: %s %s", r.Method, r.URL.Path)})
	}
	return true
}

// baseURL is the scheme and host the request came to.
func baseURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

// withBatch runs fn on batch id under the Server's lock, or answers 404.
func (s *Server) withBatch(w http.ResponseWriter, id string, fn func(*batch, time.Time)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.batches.byID[id]
	if b == nil || b.deleted {
		writeError(w, &apiError{status: http.StatusNotFound, typ: typeNotFound, message: "message_batch: " + id + " not found"})
		return
	}
	fn(b, s.now())
}

// createBatch answers POST /v1/messages/batches.
func (s *Server) createBatch(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 256<<20))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeTooLarge(w)
			return
		}
		writeError(w, invalidRequest("There was an issue with your request body: it could not be read."))
		return
	}
	var in struct {
		Requests []struct {
			CustomID string          `json:"custom_id"`
			Params   json.RawMessage `json:"params"`
		} `json:"requests"`
	}
	if err := json.Unmarshal(body, &in); err != nil {
		writeError(w, invalidRequest("There was an issue with the formatting of your request body: %v", err))
		return
	}
	switch {
	case len(in.Requests) == 0:
		writeError(w, invalidRequest("requests: at least one request is required"))
		return
	case len(in.Requests) > maxBatchRequests:
		writeError(w, invalidRequest("requests: at most %d requests per batch, got %d", maxBatchRequests, len(in.Requests)))
		return
	}
	seen := map[string]bool{}
	for i, q := range in.Requests {
		if !customIDRE.MatchString(q.CustomID) {
			writeError(w, invalidRequest("requests.%d.custom_id: 1 to 64 letters, digits, _ or -", i))
			return
		}
		if seen[q.CustomID] {
			writeError(w, invalidRequest("requests.%d.custom_id: %q is used twice; custom_id must be unique within a batch", i, q.CustomID))
			return
		}
		seen[q.CustomID] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if limit := s.cfg.BatchQueueLimit; limit > 0 {
		waiting := 0
		for _, b := range s.batches.order {
			if !b.deleted && !b.ended(now) {
				waiting += len(b.results)
			}
		}
		if waiting+len(in.Requests) > limit {
			writeError(w, &apiError{status: http.StatusTooManyRequests, typ: typeRateLimit,
				message: fmt.Sprintf("Number of batch requests in the processing queue would exceed the limit of %d.", limit)})
			return
		}
	}
	b := &batch{id: "msgbatch_" + strings.ToLower(rand.Text()), created: now, endsAt: now.Add(s.cfg.BatchDelay)}
	for _, q := range in.Requests {
		b.results = append(b.results, s.batchAnswer(q.CustomID, q.Params, now))
	}
	if s.batches.byID == nil {
		s.batches.byID = map[string]*batch{}
	}
	s.batches.byID[b.id] = b
	s.batches.order = append(s.batches.order, b)
	s.stats.Batches++
	s.stats.BatchRequests += int64(len(b.results))
	writeJSON(w, http.StatusOK, b.object(now, baseURL(r)))
}

// batchAnswer is the outcome of one batch request: its Message, as the
// Messages API would answer it, or its error. The caller holds s.mu.
func (s *Server) batchAnswer(customID string, params json.RawMessage, now time.Time) batchResult {
	errored := func(e *apiError) batchResult {
		res, _ := json.Marshal(map[string]any{"type": "errored", "error": map[string]any{
			"type": "error", "error": map[string]string{"type": e.typ, "message": e.message}}})
		return batchResult{customID: customID, result: res, kind: "errored"}
	}
	req, apiErr := parseRequest(params, false)
	switch {
	case apiErr != nil:
		return errored(apiErr)
	case req.stream:
		return errored(invalidRequest("stream: batch requests cannot stream"))
	}
	g := s.groupFor(req.model)
	if g == nil {
		return errored(modelNotFound(req.model))
	}
	p := s.price(g, req, breakpoints(req), now)
	plan := planReply(req, s.cfg.ReplyTokens)
	msg := message{ID: "msg_" + rand.Text(), Type: "message", Role: "assistant", Model: req.model, Content: []any{}, Usage: p.usage}
	for _, b := range plan.blocks {
		msg.Content = append(msg.Content, b.whole)
	}
	plan.end(&msg)
	msg.Usage.OutputTokens = plan.tokens()
	res, _ := json.Marshal(map[string]any{"type": "succeeded", "message": msg})
	return batchResult{customID: customID, result: res, kind: "succeeded"}
}

// batchResults answers GET …/{id}/results: one JSON line per request, in
// the order they were sent, once the batch ended.
func (s *Server) batchResults(w http.ResponseWriter, id string) {
	var buf bytes.Buffer
	ok := false
	s.withBatch(w, id, func(b *batch, now time.Time) {
		if !b.ended(now) {
			writeError(w, invalidRequest("Batch %s is still processing: its results are available once processing_status is \"ended\".", id))
			return
		}
		ok = true
		for _, r := range b.results {
			res := r.result
			if k := b.kindAt(r); k != r.kind {
				res = json.RawMessage(`{"type":"` + k + `"}`)
			}
			line, _ := json.Marshal(struct {
				CustomID string          `json:"custom_id"`
				Result   json.RawMessage `json:"result"`
			}{r.customID, res})
			buf.Write(line)
			buf.WriteByte('\n')
		}
	})
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/binary")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf.Bytes())
}

// deleteBatch answers DELETE …/{id}: only an ended batch may be deleted.
func (s *Server) deleteBatch(w http.ResponseWriter, id string) {
	s.withBatch(w, id, func(b *batch, now time.Time) {
		if !b.ended(now) {
			writeError(w, invalidRequest("Batch %s cannot be deleted while it is processing: cancel it first.", id))
			return
		}
		b.deleted = true
		writeJSON(w, http.StatusOK, map[string]string{"id": id, "type": "message_batch_deleted"})
	})
}

// Pagination of GET /v1/messages/batches, as the API documents it.
const (
	defaultBatchPage = 20
	maxBatchPage     = 1000
)

// listBatches answers GET /v1/messages/batches: the batches not deleted,
// newest first, one page of them. ?limit=N (1 to 1000, default 20) sizes
// the page. ?after_id=X is the page right after batch X in that order
// (older batches: how the SDK's auto-paging follows last_id); ?before_id=X
// the page right before it (newer batches, the ones nearest X, still
// newest first). has_more says whether more lie beyond the page in the
// direction of paging; first_id and last_id are the page's first and last
// batch (null for an empty page). A cursor may name a deleted batch (its
// place in the order is kept); one that never existed is refused.
func (s *Server) listBatches(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := defaultBatchPage
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxBatchPage {
			writeError(w, invalidRequest("limit: want an integer from 1 to %d, got %q", maxBatchPage, v))
			return
		}
		limit = n
	}
	afterID, beforeID := q.Get("after_id"), q.Get("before_id")
	if afterID != "" && beforeID != "" {
		writeError(w, invalidRequest("after_id and before_id: give at most one of them"))
		return
	}
	s.mu.Lock()
	now := s.now()
	// all is every batch, deleted ones too, newest first; ties (the same
	// created time) newest created first.
	all := make([]*batch, len(s.batches.order))
	for i, b := range s.batches.order {
		all[len(all)-1-i] = b
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].created.After(all[j].created) })
	cursor := -1
	if id := afterID + beforeID; id != "" {
		for i, b := range all {
			if b.id == id {
				cursor = i
				break
			}
		}
		if cursor < 0 {
			s.mu.Unlock()
			name := "after_id"
			if beforeID != "" {
				name = "before_id"
			}
			writeError(w, invalidRequest("%s: no message batch %s", name, id))
			return
		}
	}
	// Only the batches not deleted, on the side of the cursor paged to.
	var live []*batch
	switch {
	case afterID != "":
		all = all[cursor+1:]
	case beforeID != "":
		all = all[:cursor]
	}
	for _, b := range all {
		if !b.deleted {
			live = append(live, b)
		}
	}
	var page []*batch
	hasMore := len(live) > limit
	switch {
	case !hasMore:
		page = live
	case beforeID != "":
		page = live[len(live)-limit:] // the ones nearest the cursor
	default:
		page = live[:limit]
	}
	data := make([]batchObject, len(page))
	for i, b := range page {
		data[i] = b.object(now, baseURL(r))
	}
	s.mu.Unlock()
	out := map[string]any{"data": data, "has_more": hasMore, "first_id": nil, "last_id": nil}
	if len(data) > 0 {
		out["first_id"], out["last_id"] = data[0].ID, data[len(data)-1].ID
	}
	writeJSON(w, http.StatusOK, out)
}

// SetBatchOutage makes every Message Batches request (/v1/messages/batches
// and below) answer status, before any other check, with the API's error
// for it: 529 overloaded_error, 500 or 503 api_error, 429 rate_limit_error
// with retry-after: 1. 0 ends the outage. Another status panics: it is a
// programming error (POST /_fake/batches/outage answers 400 instead).
// The Messages API is not affected.
func (s *Server) SetBatchOutage(status int) {
	if !validBatchOutage(status) {
		panic(fmt.Sprintf("fakeanthropic: SetBatchOutage: status %d: want 0, 429, 500, 503 or 529", status))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batchOutage = status
}

func validBatchOutage(status int) bool {
	switch status {
	case 0, http.StatusTooManyRequests, http.StatusInternalServerError, http.StatusServiceUnavailable, 529:
		return true
	}
	return false
}

// batchOutageError is the answer of a Message Batches request during an
// outage of status (one validBatchOutage accepts, not 0).
func batchOutageError(status int) *apiError {
	switch status {
	case http.StatusTooManyRequests:
		return &apiError{status: status, typ: typeRateLimit,
			message:    "This request would exceed your organization's rate limit for the Message Batches API. Please try again later.",
			retryAfter: 1, shouldRetry: "true"}
	case http.StatusInternalServerError:
		return &apiError{status: status, typ: typeAPIError, message: "Internal server error", shouldRetry: "true"}
	case http.StatusServiceUnavailable:
		return &apiError{status: status, typ: typeAPIError, message: "Service unavailable", shouldRetry: "true"}
	}
	return overloaded()
}

// batchOutageBody is the body of POST /_fake/batches/outage.
type batchOutageBody struct {
	Status *int `json:"status"`
}

// handleBatchOutage answers POST /_fake/batches/outage: SetBatchOutage,
// then 204.
func (s *Server) handleBatchOutage(w http.ResponseWriter, r *http.Request) {
	var body batchOutageBody
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil || body.Status == nil {
		if err == nil {
			err = errors.New("status is missing")
		}
		writeError(w, invalidRequest(`body: want {"status":529} (0 ends the outage): %v`, err))
		return
	}
	if !validBatchOutage(*body.Status) {
		writeError(w, invalidRequest("status: %d is not an outage the fake can send: want 0 (none), 429, 500, 503 or 529", *body.Status))
		return
	}
	s.SetBatchOutage(*body.Status)
	w.WriteHeader(http.StatusNoContent)
}

// SetBatchDelay changes Config.BatchDelay, how long a batch processes, for
// the batches created from now on; batches already created keep their end.
// A negative d panics: it is a programming error.
func (s *Server) SetBatchDelay(d time.Duration) {
	if d < 0 {
		panic(fmt.Sprintf("fakeanthropic: SetBatchDelay: %v: must not be negative", d))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg.BatchDelay = d
}
