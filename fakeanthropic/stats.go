package fakeanthropic

import (
	"maps"
	"net/http"
	"time"
)

// logCapacity is how many requests Stats.Log keeps.
const logCapacity = 10_000

// statusClientClosed is the status logged for a non-streaming request whose
// client went away before the answer (nginx's convention; nothing is sent).
const statusClientClosed = 499

// Stats are counters of /v1/messages requests since New or ResetStats.
// count_tokens calls only count in CountTokensRequests.
type Stats struct {
	// Requests is the number of /v1/messages requests received.
	Requests int64 `json:"requests"`
	// ByStatus counts answers by HTTP status. A stream that started with 200
	// counts as 200 even if it then faulted; dropped connections and
	// non-streaming requests whose client left before the answer are not
	// answers (see Dropped and the Log).
	ByStatus map[int]int64 `json:"by_status"`
	// RateLimited is the number of 429s sent, from full buckets and faults.
	RateLimited int64 `json:"rate_limited"`
	// Dropped is the number of connections closed without any answer
	// (FaultDrop).
	Dropped int64 `json:"dropped"`
	// InFlight is the number of /v1/messages calls being handled now, from
	// arrival until just before the last bytes of the answer (so that a
	// client that has read its answer already finds it counted out and
	// logged).
	InFlight int64 `json:"in_flight"`
	// MaxInFlight is the highest InFlight seen.
	MaxInFlight int64 `json:"max_in_flight"`
	// MaxInFlightByGroup is the highest concurrency per group, counted from
	// the moment the model is known.
	MaxInFlightByGroup map[string]int64 `json:"max_in_flight_by_group"`
	// AdmittedInputTokens are, per group, the input tokens charged to the
	// ITPM bucket (input tokens plus cache writes, plus cache reads on
	// groups with CountCacheReads) by admitted requests.
	AdmittedInputTokens map[string]int64 `json:"admitted_input_tokens"`
	// AdmittedCacheReadTokens and AdmittedCacheCreationTokens are, per
	// group, the cache_read_input_tokens and cache_creation_input_tokens
	// reported to admitted requests.
	AdmittedCacheReadTokens     map[string]int64 `json:"admitted_cache_read_input_tokens"`
	AdmittedCacheCreationTokens map[string]int64 `json:"admitted_cache_creation_input_tokens"`
	// CacheWriteRequests are, per group, the admitted requests that wrote
	// the cache (cache_creation_input_tokens > 0).
	CacheWriteRequests map[string]int64 `json:"cache_write_requests"`
	// AdmittedOutputTokens are, per group, the output tokens produced,
	// including those of cut or canceled answers.
	AdmittedOutputTokens map[string]int64 `json:"admitted_output_tokens"`
	// AdmittedRequests are, per group, the requests admitted by the buckets.
	AdmittedRequests map[string]int64 `json:"admitted_requests"`
	// CountTokensRequests is the number of /v1/messages/count_tokens calls.
	CountTokensRequests int64 `json:"count_tokens_requests"`
	// Batches and BatchRequests count the Message Batches created and the
	// requests in them (not in Requests: they are not /v1/messages calls).
	Batches       int64 `json:"batches"`
	BatchRequests int64 `json:"batch_requests"`
	// CacheEntries is the number of live prompt-cache entries now (not a
	// counter: ResetStats leaves the cache alone; ClearCache empties it).
	CacheEntries int64 `json:"cache_entries"`
	// Log holds the last 10,000 /v1/messages requests, oldest first, in the
	// order they finished.
	Log []RequestRecord `json:"log"`
}

// RequestRecord is one /v1/messages request in Stats.Log.
type RequestRecord struct {
	// At is when the request arrived, on Config.Clock.
	At time.Time `json:"at"`
	// Group and Model are empty when the request was refused before its
	// model was known.
	Group string `json:"group,omitempty"`
	Model string `json:"model,omitempty"`
	// Status is the HTTP status sent; 0 for a dropped connection, 499 for a
	// non-streaming request whose client left before the answer.
	Status int       `json:"status"`
	Fault  FaultKind `json:"fault,omitempty"`
	Stream bool      `json:"stream"`
	// InputTokens are the tokens charged to ITPM: usage.input_tokens plus
	// cache_creation_input_tokens (plus cache_read_input_tokens on groups
	// with CountCacheReads).
	InputTokens int `json:"input_tokens"`
	// CacheReadInputTokens and CacheCreationInputTokens are the usage's,
	// for admitted requests (0 for refused ones): a call that wrote the
	// cache has CacheCreationInputTokens > 0.
	CacheReadInputTokens     int `json:"cache_read_input_tokens"`
	CacheCreationInputTokens int `json:"cache_creation_input_tokens"`
	// OutputTokens are the output tokens produced.
	OutputTokens int    `json:"output_tokens"`
	UserID       string `json:"user_id,omitempty"`
	// Complete: the whole answer was sent (a stream to its message_stop):
	// a call the account pays for in full.
	Complete bool `json:"complete"`
}

// statsState is the mutable side of Stats, guarded by Server.mu.
type statsState struct {
	Stats
	inFlightByGroup map[string]int64
	log             []RequestRecord // ring of logCapacity records
	next            int             // where the next record goes once log is full
}

func newStatsState(groups []Group) statsState {
	st := statsState{
		Stats: Stats{
			ByStatus:             map[int]int64{},
			MaxInFlightByGroup:   map[string]int64{},
			AdmittedInputTokens:  map[string]int64{},
			AdmittedOutputTokens: map[string]int64{},
			AdmittedRequests:     map[string]int64{},

			AdmittedCacheReadTokens:     map[string]int64{},
			AdmittedCacheCreationTokens: map[string]int64{},
			CacheWriteRequests:          map[string]int64{},
		},
		inFlightByGroup: map[string]int64{},
	}
	for _, g := range groups {
		st.MaxInFlightByGroup[g.Name] = 0
		st.AdmittedInputTokens[g.Name] = 0
		st.AdmittedOutputTokens[g.Name] = 0
		st.AdmittedRequests[g.Name] = 0
		st.AdmittedCacheReadTokens[g.Name] = 0
		st.AdmittedCacheCreationTokens[g.Name] = 0
		st.CacheWriteRequests[g.Name] = 0
		st.inFlightByGroup[g.Name] = 0
	}
	return st
}

func (st *statsState) appendLog(rec RequestRecord) {
	if len(st.log) < logCapacity {
		st.log = append(st.log, rec)
		return
	}
	st.log[st.next] = rec
	st.next = (st.next + 1) % logCapacity
}

// Stats returns a copy of the counters and the log.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.stats.Stats
	out.ByStatus = maps.Clone(s.stats.ByStatus)
	out.MaxInFlightByGroup = maps.Clone(s.stats.MaxInFlightByGroup)
	out.AdmittedInputTokens = maps.Clone(s.stats.AdmittedInputTokens)
	out.AdmittedOutputTokens = maps.Clone(s.stats.AdmittedOutputTokens)
	out.AdmittedRequests = maps.Clone(s.stats.AdmittedRequests)
	out.AdmittedCacheReadTokens = maps.Clone(s.stats.AdmittedCacheReadTokens)
	out.AdmittedCacheCreationTokens = maps.Clone(s.stats.AdmittedCacheCreationTokens)
	out.CacheWriteRequests = maps.Clone(s.stats.CacheWriteRequests)
	out.CacheEntries = int64(s.liveCacheEntries())
	out.Log = make([]RequestRecord, 0, len(s.stats.log))
	out.Log = append(out.Log, s.stats.log[s.stats.next:]...)
	out.Log = append(out.Log, s.stats.log[:s.stats.next]...)
	return out
}

// ResetStats zeroes the counters and empties the log. Requests in flight
// stay counted in InFlight (and so in MaxInFlight); buckets and queued
// faults are untouched.
func (s *Server) ResetStats() {
	s.mu.Lock()
	defer s.mu.Unlock()
	inFlight, byGroup := s.stats.InFlight, s.stats.inFlightByGroup
	s.stats = newStatsState(s.cfg.Groups)
	s.stats.InFlight, s.stats.MaxInFlight = inFlight, inFlight
	s.stats.inFlightByGroup = byGroup
	for name, n := range byGroup {
		s.stats.MaxInFlightByGroup[name] = n
	}
}

// requestStarted counts a /v1/messages request in.
func (s *Server) requestStarted() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.Requests++
	s.stats.InFlight++
	s.stats.MaxInFlight = max(s.stats.MaxInFlight, s.stats.InFlight)
}

// requestFinished counts a /v1/messages request out and logs it.
func (s *Server) requestFinished(rec RequestRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.InFlight--
	switch rec.Status {
	case 0:
		s.stats.Dropped++
	case statusClientClosed:
	default:
		s.stats.ByStatus[rec.Status]++
	}
	if rec.Status == http.StatusTooManyRequests {
		s.stats.RateLimited++
	}
	s.stats.appendLog(rec)
}

// groupEntered counts a request in its group's concurrency; the returned
// func counts it out.
func (s *Server) groupEntered(name string) (left func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.inFlightByGroup[name]++
	s.stats.MaxInFlightByGroup[name] = max(s.stats.MaxInFlightByGroup[name], s.stats.inFlightByGroup[name])
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.stats.inFlightByGroup[name]--
	}
}
