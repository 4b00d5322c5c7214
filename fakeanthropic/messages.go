package fakeanthropic

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// handleMessages answers POST /v1/messages and accounts for it in Stats.
func (s *Server) handleMessages(w http.ResponseWriter, r *http.Request) {
	c := &call{s: s, rec: RequestRecord{At: s.now()}}
	s.requestStarted()
	defer func() {
		c.settle() // if no answer settled it: a canceled request, or a panic
		rec := c.rec
		s.logger.Debug("fake-anthropic request", "request_id", w.Header().Get("request-id"),
			"group", rec.Group, "model", rec.Model, "status", rec.Status, "fault", rec.Fault,
			"stream", rec.Stream, "input_tokens", rec.InputTokens, "output_tokens", rec.OutputTokens,
			"cache_read_input_tokens", rec.CacheReadInputTokens,
			"cache_creation_input_tokens", rec.CacheCreationInputTokens)
	}()
	s.serveMessages(w, r, c)
}

// call is the bookkeeping of one /v1/messages request.
type call struct {
	s        *Server
	rec      RequestRecord
	group    *groupState // nil until the model is known
	left     func()      // counts the call out of its group
	reserved int         // output tokens reserved (reserve mode)
	// cacheWrites are the cache entries the call writes, readable once its
	// answer begins.
	cacheWrites []breakpoint
	settled     bool
}

// pricing is what a call's prompt costs: its usage (output_tokens aside)
// and the tokens charged to the ITPM bucket.
type pricing struct {
	usage   usage
	charged int
	plan    cachePlan
}

// price works out req's usage from the cache at now. The caller holds
// Server.mu; the cache is not changed.
func (s *Server) price(g *groupState, req *messagesRequest, bps []breakpoint, now time.Time) pricing {
	plan := s.planCache(bps, g.minCacheTokens(req.model), now)
	// The directives describe a cached prefix on top of the counted prompt.
	write, read := max(0, req.directives.cacheWrite), max(0, req.directives.cacheRead)
	u := usage{
		InputTokens:              req.inputTokens - plan.read - plan.creation,
		CacheCreationInputTokens: plan.creation + write,
		CacheReadInputTokens:     plan.read + read,
		CacheCreation: &cacheCreation{
			Ephemeral5mInputTokens: plan.creation5m + write,
			Ephemeral1hInputTokens: plan.creation1h,
		},
	}
	// ITPM counts input tokens and cache writes; cache reads only on groups
	// that count them (legacy models).
	charged := u.InputTokens + u.CacheCreationInputTokens
	if g.CountCacheReads {
		charged += u.CacheReadInputTokens
	}
	return pricing{usage: u, charged: charged, plan: plan}
}

// settle closes the books of the call: it gives back the unused output
// reservation and records the call in Stats. The answer calls it just before
// its last bytes, so that a client that has read its answer finds it in
// Stats; later calls do nothing.
func (c *call) settle() {
	if c.settled {
		return
	}
	c.settled = true
	s := c.s
	if c.reserved > 0 {
		s.mu.Lock()
		c.group.refill(s.now())
		c.group.output.give(float64(c.reserved - c.rec.OutputTokens))
		s.mu.Unlock()
	}
	if c.left != nil {
		c.left()
	}
	s.requestFinished(c.rec)
}

// serveMessages runs one Messages call and fills in c. The steps follow the
// API: size, auth, body, model; then a queued or random fault; then the rate
// limiter; then the paced reply.
func (s *Server) serveMessages(w http.ResponseWriter, r *http.Request, c *call) {
	rec := &c.rec
	fail := func(e *apiError) {
		rec.Status = e.status
		c.settle()
		writeError(w, e)
	}
	req, apiErr, tooLarge := s.readRequest(w, r, false)
	switch {
	case tooLarge:
		rec.Status = http.StatusRequestEntityTooLarge
		c.settle()
		writeTooLarge(w)
		return
	case apiErr != nil:
		fail(apiErr)
		return
	}
	rec.Model, rec.Stream, rec.UserID = req.model, req.stream, req.userID
	g := s.groupFor(req.model)
	if g == nil {
		fail(modelNotFound(req.model))
		return
	}
	rec.Group, c.group, c.left = g.Name, g, s.groupEntered(g.Name)
	bps := breakpoints(req)

	rule, queued := s.drawFault()
	rec.Fault = rule.Kind
	now := s.now()
	if rule.Kind == FaultDrop || !rule.Kind.admitted(req.stream) {
		// Refused before the buckets: the cache is neither read nor written.
		s.mu.Lock()
		rec.InputTokens = s.price(g, req, bps, now).charged
		g.refill(now)
		h := g.headers(now)
		s.mu.Unlock()
		if rule.Kind == FaultDrop {
			rec.Status = 0
			c.settle()
			dropConnection(w)
			return
		}
		e := faultError(rule, now)
		if e.status == http.StatusTooManyRequests {
			h.write(w.Header())
		}
		fail(e)
		return
	}

	// Price, admit and (if admitted) touch the cache in one step, so that
	// the cache the price was read from is the one the call uses.
	s.mu.Lock()
	p := s.price(g, req, bps, now)
	rec.InputTokens = p.charged
	charge, h, refused := s.admit(g, p.charged, req.maxTokens, now)
	if refused == nil {
		s.stats.AdmittedRequests[g.Name]++
		s.stats.AdmittedInputTokens[g.Name] += int64(charge.input)
		s.stats.AdmittedCacheReadTokens[g.Name] += int64(p.usage.CacheReadInputTokens)
		s.stats.AdmittedCacheCreationTokens[g.Name] += int64(p.usage.CacheCreationInputTokens)
		if p.usage.CacheCreationInputTokens > 0 {
			s.stats.CacheWriteRequests[g.Name]++
		}
		s.touchCache(p.plan, now)
		c.cacheWrites = p.plan.writes
		rec.CacheReadInputTokens = p.usage.CacheReadInputTokens
		rec.CacheCreationInputTokens = p.usage.CacheCreationInputTokens
	}
	s.mu.Unlock()
	h.write(w.Header())
	if refused != nil {
		if queued {
			s.requeue(rule) // the stream fault waits for a request that runs
		}
		rec.Fault = ""
		fail(refused)
		return
	}
	c.reserved = charge.reserved

	out := &output{s: s, c: c, ctx: r.Context(), start: time.Now(), plan: planReply(req, s.cfg.ReplyTokens),
		latency: s.cfg.Latency + time.Duration(max(0, req.directives.latencyMS))*time.Millisecond}
	msg := message{
		ID:      "msg_" + rand.Text(),
		Type:    "message",
		Role:    "assistant",
		Model:   req.model,
		Content: []any{},
		Usage:   p.usage,
	}
	if req.stream {
		s.writeStream(w, out, msg, rule.Kind)
	} else {
		s.writeMessage(w, out, msg, rule.Kind)
	}
}

// output produces the tokens of one reply at the configured pace.
type output struct {
	s     *Server
	c     *call
	ctx   context.Context
	start time.Time // wall clock
	plan  reply
	// latency is the wait before the answer begins: Config.Latency and
	// the request's [[latency_ms=N]].
	latency time.Duration
}

func (o *output) produced() int { return o.c.rec.OutputTokens }

// firstByte waits for the configured latency; then the answer begins, and
// the cache entries the call writes become readable.
func (o *output) firstByte() error {
	if err := o.s.pause(o.ctx, o.start.Add(o.latency)); err != nil {
		return err
	}
	if writes := o.c.cacheWrites; len(writes) > 0 {
		o.c.cacheWrites = nil
		o.s.mu.Lock()
		o.s.commitCache(writes, o.s.now())
		o.s.mu.Unlock()
	}
	return nil
}

// next waits until the next token is due, then produces it: it counts in
// Stats and, in realtime OTPM mode, in the output bucket. It returns an
// error if the client went away.
func (o *output) next() error {
	due := o.start.Add(o.latency)
	if tps := o.s.cfg.TokensPerSecond; tps > 0 {
		due = due.Add(time.Duration(float64(o.produced()+1) / tps * float64(time.Second)))
	}
	if err := o.s.pause(o.ctx, due); err != nil {
		return err
	}
	s, g := o.s, o.c.group
	s.mu.Lock()
	s.stats.AdmittedOutputTokens[g.Name]++
	if s.cfg.OTPMMode == OTPMRealtime {
		g.output.refill(s.now())
		g.output.take(1)
	}
	s.mu.Unlock()
	o.c.rec.OutputTokens++
	return nil
}

// Wire types of the Messages API, in the API's field order.
type (
	// usage is the usage of a message (and of message_start), with the
	// cache_creation breakdown by ttl; message_delta's usage has no
	// breakdown (CacheCreation nil).
	usage struct {
		InputTokens              int            `json:"input_tokens"`
		CacheCreationInputTokens int            `json:"cache_creation_input_tokens"`
		CacheReadInputTokens     int            `json:"cache_read_input_tokens"`
		CacheCreation            *cacheCreation `json:"cache_creation,omitempty"`
		OutputTokens             int            `json:"output_tokens"`
	}
	cacheCreation struct {
		Ephemeral5mInputTokens int `json:"ephemeral_5m_input_tokens"`
		Ephemeral1hInputTokens int `json:"ephemeral_1h_input_tokens"`
	}
	message struct {
		ID           string  `json:"id"`
		Type         string  `json:"type"`
		Role         string  `json:"role"`
		Model        string  `json:"model"`
		Content      []any   `json:"content"`
		StopReason   *string `json:"stop_reason"`
		StopSequence *string `json:"stop_sequence"`
		// StopDetails, Container and FutureField: only with
		// [[delta_fields]] (see deltaExtras).
		StopDetails json.RawMessage `json:"stop_details,omitempty"`
		Usage       usage           `json:"usage"`
		Container   *containerInfo  `json:"container,omitempty"`
		FutureField *futureField    `json:"future_field,omitempty"`
		// ContextManagement: only with [[delta_fields]]; a stream sends
		// it on the message_delta event itself, beside the delta.
		ContextManagement json.RawMessage `json:"context_management,omitempty"`
	}
	messageStartEvent struct {
		Type    string  `json:"type"`
		Message message `json:"message"`
	}
	contentBlockStartEvent struct {
		Type         string `json:"type"`
		Index        int    `json:"index"`
		ContentBlock any    `json:"content_block"`
	}
	contentBlockDeltaEvent struct {
		Type  string `json:"type"`
		Index int    `json:"index"`
		Delta any    `json:"delta"`
	}
	// futureEvent is an event type no client knows ([[unknown_event]]).
	futureEvent struct {
		Type   string `json:"type"`
		Index  int    `json:"index"`
		Detail string `json:"detail"`
	}
	contentBlockStopEvent struct {
		Type  string `json:"type"`
		Index int    `json:"index"`
	}
	messageDeltaEvent struct {
		Type              string          `json:"type"`
		Delta             messageDelta    `json:"delta"`
		Usage             usage           `json:"usage"`
		ContextManagement json.RawMessage `json:"context_management,omitempty"`
	}
	messageDelta struct {
		StopReason   *string         `json:"stop_reason"`
		StopSequence *string         `json:"stop_sequence"`
		StopDetails  json.RawMessage `json:"stop_details,omitempty"`
		Container    *containerInfo  `json:"container,omitempty"`
		FutureField  *futureField    `json:"future_field,omitempty"`
	}
	typeOnlyEvent struct {
		Type string `json:"type"`
	}
)

// writeMessage produces the whole reply, then answers it as one JSON
// message. A client that leaves first is logged as 499.
func (s *Server) writeMessage(w http.ResponseWriter, out *output, msg message, fault FaultKind) {
	c := out.c
	c.rec.Status = statusClientClosed
	if out.firstByte() != nil {
		return
	}
	for out.produced() < out.plan.tokens() {
		if err := out.next(); err != nil {
			return
		}
	}
	for _, b := range out.plan.blocks {
		msg.Content = append(msg.Content, b.whole)
	}
	out.plan.end(&msg)
	msg.Usage.OutputTokens = out.produced()
	c.rec.Status = http.StatusOK
	c.rec.Complete = fault != FaultStreamCut
	c.settle()
	if fault != FaultStreamCut {
		writeJSON(w, http.StatusOK, msg)
		return
	}

	// Cut: announce the whole body, send half of it, close the connection.
	b, _ := json.Marshal(msg)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b[:len(b)/2])
	_ = http.NewResponseController(w).Flush()
	dropConnection(w)
}

// writeStream answers with server-sent events, one text_delta per token,
// flushed as produced. A stream fault stops after half of the deltas, with an
// error event (stream_error) or nothing more (stream_cut).
func (s *Server) writeStream(w http.ResponseWriter, out *output, msg message, fault FaultKind) {
	c := out.c
	c.rec.Status = statusClientClosed
	if out.firstByte() != nil {
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	if fault == FaultStreamCut {
		h.Set("Connection", "close")
	}
	c.rec.Status = http.StatusOK
	w.WriteHeader(http.StatusOK)
	ev := &eventWriter{w: w, rc: http.NewResponseController(w)}

	start := msg
	start.Usage.OutputTokens = 1
	ev.send("message_start", messageStartEvent{Type: "message_start", Message: start})
	ev.send("ping", typeOnlyEvent{Type: "ping"})
	if out.plan.unknownEvent {
		ev.send("content_block_future", futureEvent{Type: "content_block_future", Index: 0,
			Detail: "an event type this client does not know"})
	}

	// A stream fault stops right after half of the output tokens.
	faulted := fault == FaultStreamError || fault == FaultStreamCut
	n := out.plan.tokens()
	if faulted {
		n = cutPoint(n)
	}
blocks:
	for i, b := range out.plan.blocks {
		ev.send("content_block_start", contentBlockStartEvent{Type: "content_block_start", Index: i, ContentBlock: b.start})
		for _, d := range b.deltas {
			if ev.err != nil {
				break blocks
			}
			if d.token {
				if err := out.next(); err != nil {
					return
				}
				if faulted && out.produced() == n && fault == FaultStreamCut {
					c.settle() // the last bytes of a cut stream
				}
			}
			ev.send("content_block_delta", contentBlockDeltaEvent{Type: "content_block_delta", Index: i, Delta: d.delta})
			if d.token && faulted && out.produced() == n {
				break blocks
			}
		}
		ev.send("content_block_stop", contentBlockStopEvent{Type: "content_block_stop", Index: i})
	}
	c.rec.Complete = !faulted && ev.err == nil
	c.settle()
	switch fault {
	case FaultStreamError:
		ev.send("error", overloaded().body(h.Get("request-id")))
		return
	case FaultStreamCut:
		return
	}
	u := msg.Usage
	u.OutputTokens = out.produced()
	u.CacheCreation = nil
	ev.send("message_delta", messageDeltaEvent{Type: "message_delta", Delta: out.plan.delta(), Usage: u, ContextManagement: out.plan.contextManagement()})
	ev.send("message_stop", typeOnlyEvent{Type: "message_stop"})
}

// eventWriter writes server-sent events, each flushed at once. After the
// first write error (the client left) it writes nothing more.
type eventWriter struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	err error
}

func (e *eventWriter) send(event string, data any) {
	if e.err != nil {
		return
	}
	b, err := json.Marshal(data)
	if err != nil {
		panic(fmt.Sprintf("fakeanthropic: marshal %T: %v", data, err))
	}
	if _, e.err = fmt.Fprintf(e.w, "event: %s\ndata: %s\n\n", event, b); e.err == nil {
		e.err = e.rc.Flush()
	}
}
