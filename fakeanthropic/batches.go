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
	msg.StopReason = &plan.stopReason
	msg.StopSequence = plan.stopSequence
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

// listBatches answers GET /v1/messages/batches: every batch not deleted,
// newest first (one page).
func (s *Server) listBatches(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	now := s.now()
	var data []batchObject
	for _, b := range s.batches.order {
		if !b.deleted {
			data = append(data, b.object(now, baseURL(r)))
		}
	}
	s.mu.Unlock()
	sort.SliceStable(data, func(i, j int) bool { return data[i].CreatedAt > data[j].CreatedAt })
	out := map[string]any{"data": data, "has_more": false, "first_id": nil, "last_id": nil}
	if len(data) > 0 {
		out["first_id"], out["last_id"] = data[0].ID, data[len(data)-1].ID
	} else {
		out["data"] = []batchObject{}
	}
	writeJSON(w, http.StatusOK, out)
}
