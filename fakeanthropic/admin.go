package fakeanthropic

import (
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
)

// The Rate Limits API: GET /v1/organizations/rate_limits, an Admin API
// route that lists the organization's limits per rate-limit group.
//
// What the wire format rests on. Verified against the official Go SDK
// (github.com/anthropics/anthropic-sdk-go/v2 v2.15.0,
// organizationratelimit.go, organizationworkspaceratelimit.go and
// packages/pagination), which is generated from the API's specification:
//
//   - the route, GET /v1/organizations/rate_limits, and its query
//     parameters model, group_type, limit (1 to 1,000) and page;
//   - the envelope {"data":[...],"next_page":cursor-or-null} (the SDK's
//     PageCursor; no has_more, first_id or last_id), every entry in one page
//     when limit is absent;
//   - an entry's fields: "type":"rate_limit", "id", "group" {"type",
//     "id", "display_name" (model groups only)}, "models" (names, null for
//     non-model groups) and "limits" [{"type","value"}];
//   - the group types model_group, batch, token_count, files, skills and
//     web_search, and group ids like rlg_01VPTCmyiu5ZLsWkcxYG2pY8;
//   - the limiter types requests_per_minute, input_tokens_per_minute
//     (cache reads count), input_tokens_per_minute_cache_aware (they do
//     not: the usual type on current models) and output_tokens_per_minute;
//   - a model filter that matches no entry answers 404.
//
// Assumed (not in the SDK): the id formats the fake makes up (rl_… for an
// entry, rlg_… derived from the group's name), the display_name (the
// group's Name), the order of limits, the cursor format, the wording of
// error messages, that only model_group entries are listed (the fake has
// no batch, files, skills, web_search or token_count groups; its
// count_tokens buckets are not reported), that a missing anthropic-version
// is a 400 as elsewhere, and the authentication rules: a missing or unknown
// key is 401 authentication_error, an ordinary API key is 403
// permission_error.

// Rate-limit group types of the Rate Limits API.
var rateLimitGroupTypes = []string{"batch", "files", "model_group", "skills", "token_count", "web_search"}

// Wire types of the Rate Limits API.
type (
	rateLimitPage struct {
		Data     []rateLimitEntry `json:"data"`
		NextPage *string          `json:"next_page"`
	}
	rateLimitEntry struct {
		Type   string           `json:"type"`
		ID     string           `json:"id"`
		Group  rateLimitGroup   `json:"group"`
		Models []string         `json:"models"`
		Limits []rateLimitValue `json:"limits"`
	}
	rateLimitGroup struct {
		Type        string `json:"type"`
		ID          string `json:"id"`
		DisplayName string `json:"display_name"`
	}
	rateLimitValue struct {
		Type  string `json:"type"`
		Value int    `json:"value"`
	}
)

// adminKeyPrefix starts every real Admin API key.
const adminKeyPrefix = "sk-ant-admin"

// authenticateAdmin checks an Admin API request's key: an admin key passes;
// a missing or unknown key is 401; a key the Messages API accepts (and that
// does not look like an admin key) is 403.
func (s *Server) authenticateAdmin(r *http.Request) *apiError {
	key := requestKey(r)
	switch {
	case key == "":
		return missingKey()
	case len(s.cfg.AdminKeys) == 0 && strings.HasPrefix(key, adminKeyPrefix):
		return nil
	case oneOf(key, s.cfg.AdminKeys):
		return nil
	case !strings.HasPrefix(key, adminKeyPrefix) && s.validAPIKey(key):
		return &apiError{status: http.StatusForbidden, typ: typePermission,
			message: "Your API key does not have permission to use the specified resource. The Rate Limits API requires an Admin API key (sk-ant-admin…)."}
	}
	return invalidKey()
}

// opaqueID derives a stable id from a group's name.
func opaqueID(prefix, kind, name string) string {
	sum := sha256.Sum256([]byte(kind + "\x00" + name))
	return prefix + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:15]))
}

// rateLimitEntry is g as the Rate Limits API lists it. The caller holds
// Server.mu.
func (g *groupState) rateLimitEntry() rateLimitEntry {
	models := g.ReportedModels
	if len(models) == 0 {
		models = g.Models
	}
	input := "input_tokens_per_minute_cache_aware"
	if g.CountCacheReads {
		input = "input_tokens_per_minute"
	}
	return rateLimitEntry{
		Type:   "rate_limit",
		ID:     opaqueID("rl_", "entry", g.Name),
		Group:  rateLimitGroup{Type: "model_group", ID: opaqueID("rlg_", "group", g.Name), DisplayName: g.Name},
		Models: slices.Clone(models),
		Limits: []rateLimitValue{
			{Type: "requests_per_minute", Value: g.RPM},
			{Type: input, Value: g.InputTPM},
			{Type: "output_tokens_per_minute", Value: g.OutputTPM},
		},
	}
}

// reports reports whether the group's entry contains model: a model it
// lists, or one its patterns match.
func (g *groupState) reports(model string) bool {
	if slices.Contains(g.ReportedModels, model) {
		return true
	}
	for _, p := range g.Models {
		if ok, _ := path.Match(p, model); ok {
			return true
		}
	}
	return false
}

// pageCursorPrefix starts the fake's next_page cursors: "rlp_<offset>".
const pageCursorPrefix = "rlp_"

// handleRateLimits answers GET /v1/organizations/rate_limits.
func (s *Server) handleRateLimits(w http.ResponseWriter, r *http.Request) {
	if apiErr := s.authenticateAdmin(r); apiErr != nil {
		writeError(w, apiErr)
		return
	}
	if r.Header.Get("anthropic-version") == "" {
		writeError(w, invalidRequest("anthropic-version: header is required"))
		return
	}
	q := r.URL.Query()
	groupType := q.Get("group_type")
	if groupType != "" && !slices.Contains(rateLimitGroupTypes, groupType) {
		writeError(w, invalidRequest("group_type: Input should be 'batch', 'files', 'model_group', 'skills', 'token_count' or 'web_search'"))
		return
	}
	limit := 0
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		switch {
		case err != nil:
			writeError(w, invalidRequest("limit: Input should be a valid integer"))
			return
		case n < 1:
			writeError(w, invalidRequest("limit: Input should be greater than or equal to 1"))
			return
		case n > 1000:
			writeError(w, invalidRequest("limit: Input should be less than or equal to 1000"))
			return
		}
		limit = n
	}
	offset := 0
	if v := q.Get("page"); v != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(v, pageCursorPrefix))
		if !strings.HasPrefix(v, pageCursorPrefix) || err != nil || n < 0 {
			writeError(w, invalidRequest("page: invalid page cursor"))
			return
		}
		offset = n
	}
	model := q.Get("model")

	var entries []rateLimitEntry
	s.mu.Lock()
	for _, g := range s.groups {
		if groupType != "" && groupType != "model_group" {
			break // the fake has model groups only
		}
		if model != "" && !g.reports(model) {
			continue
		}
		entries = append(entries, g.rateLimitEntry())
		if model != "" {
			break // the single entry containing the model
		}
	}
	s.mu.Unlock()
	if model != "" && len(entries) == 0 {
		writeError(w, &apiError{status: http.StatusNotFound, typ: typeNotFound,
			message: fmt.Sprintf("No rate limits found for model: %s", model)})
		return
	}

	page := rateLimitPage{Data: []rateLimitEntry{}}
	if offset < len(entries) {
		entries = entries[offset:]
		if limit > 0 && limit < len(entries) {
			next := pageCursorPrefix + strconv.Itoa(offset+limit)
			page.NextPage = &next
			entries = entries[:limit]
		}
		page.Data = entries
	}
	writeJSON(w, http.StatusOK, page)
}

// Groups returns the model groups with their limits now (SetGroupLimits
// changes them).
func (s *Server) Groups() []Group {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Group, len(s.groups))
	for i, g := range s.groups {
		out[i] = g.Group
		out[i].Models = slices.Clone(g.Models)
		out[i].ReportedModels = slices.Clone(g.ReportedModels)
	}
	return out
}

// SetGroupLimits changes a group's limits while the server runs, as an
// organization's limits change upstream: the buckets enforce them from now
// on (what was used stays used, so a bucket 4 requests short of 10 is 4
// short of a new limit of 5; count_tokens's bucket follows rpm), the
// anthropic-ratelimit-* headers and 429 messages name them, and GET
// /v1/organizations/rate_limits reports them. A zero keeps that limit.
// POST /_fake/limits does the same.
func (s *Server) SetGroupLimits(group string, rpm, inputTPM, outputTPM int) error {
	if rpm < 0 || inputTPM < 0 || outputTPM < 0 {
		return fmt.Errorf("fakeanthropic: limits of group %q must not be negative (got %d, %d, %d)", group, rpm, inputTPM, outputTPM)
	}
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.groups {
		if g.Name == group {
			g.setLimits(rpm, inputTPM, outputTPM, now)
			return nil
		}
	}
	return fmt.Errorf("fakeanthropic: %w %q", errUnknownGroup, group)
}

var errUnknownGroup = errors.New("no group named")

// limitsBody is the body of POST /_fake/limits and of its answer.
type limitsBody struct {
	Group     string `json:"group"`
	RPM       int    `json:"rpm"`
	InputTPM  int    `json:"input_tpm"`
	OutputTPM int    `json:"output_tpm"`
}

// handleSetLimits answers POST /_fake/limits: SetGroupLimits, then the
// group's limits now.
func (s *Server) handleSetLimits(w http.ResponseWriter, r *http.Request) {
	var body limitsBody
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		writeError(w, invalidRequest(`body: want {"group":"claude","rpm":10,"input_tpm":5000,"output_tpm":1000} (0 or absent: unchanged): %v`, err))
		return
	}
	if err := s.SetGroupLimits(body.Group, body.RPM, body.InputTPM, body.OutputTPM); err != nil {
		if errors.Is(err, errUnknownGroup) {
			writeError(w, &apiError{status: http.StatusNotFound, typ: typeNotFound, message: fmt.Sprintf("group: no group named %q", body.Group)})
			return
		}
		writeError(w, invalidRequest("%v", err))
		return
	}
	for _, g := range s.Groups() {
		if g.Name == body.Group {
			writeJSON(w, http.StatusOK, limitsBody{Group: g.Name, RPM: g.RPM, InputTPM: g.InputTPM, OutputTPM: g.OutputTPM})
			return
		}
	}
}
