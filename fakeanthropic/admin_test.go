package fakeanthropic_test

import (
	"encoding/json"
	"errors"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

const adminKey = "sk-ant-admin01-test"

// getAdmin sends GET path with the given headers (x-api-key, and
// anthropic-version unless hdr clears it).
func getAdmin(t testing.TB, srv *httptest.Server, path string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("anthropic-version", "2023-06-01")
	for k, v := range hdr {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, b
}

func twoGroups() []fakeanthropic.Group {
	return []fakeanthropic.Group{
		{Name: "sonnet", Models: []string{"claude-sonnet-*"}, ReportedModels: []string{"claude-sonnet-4-5", "claude-sonnet-4-6"},
			RPM: 50, InputTPM: 30_000, OutputTPM: 8_000},
		{Name: "haiku", Models: []string{"claude-haiku-4-5"}, CountCacheReads: true, RPM: 50, InputTPM: 50_000, OutputTPM: 10_000},
	}
}

func TestRateLimitsWireFormat(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{Groups: twoGroups(), AdminKeys: []string{adminKey}})
	res, b := getAdmin(t, srv, "/v1/organizations/rate_limits", map[string]string{"x-api-key": adminKey})
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, content-type %q: %s", res.StatusCode, res.Header.Get("Content-Type"), b)
	}
	var page map[string]json.RawMessage
	if err := json.Unmarshal(b, &page); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"data", "next_page"}, slices.Sorted(maps.Keys(page))); diff != "" {
		t.Errorf("page keys (-want +got):\n%s", diff)
	}
	if string(page["next_page"]) != "null" {
		t.Errorf("next_page %s, want null", page["next_page"])
	}
	var entries []map[string]any
	if err := json.Unmarshal(page["data"], &entries); err != nil || len(entries) != 2 {
		t.Fatalf("data %s: want two entries (%v)", page["data"], err)
	}
	for _, e := range entries {
		if diff := cmp.Diff([]string{"group", "id", "limits", "models", "type"}, slices.Sorted(maps.Keys(e))); diff != "" {
			t.Errorf("entry keys (-want +got):\n%s", diff)
		}
		group, _ := e["group"].(map[string]any)
		if id, _ := group["id"].(string); len(id) < 5 || id[:4] != "rlg_" {
			t.Errorf("group id %v: want rlg_…", group["id"])
		}
		if id, _ := e["id"].(string); id == "" || id == group["id"] {
			t.Errorf("entry id %v: want its own id, not the group's", e["id"])
		}
		delete(group, "id")
		delete(e, "id")
	}
	want := []map[string]any{
		{"type": "rate_limit", "group": map[string]any{"type": "model_group", "display_name": "sonnet"},
			"models": []any{"claude-sonnet-4-5", "claude-sonnet-4-6"},
			"limits": []any{
				map[string]any{"type": "requests_per_minute", "value": 50.0},
				map[string]any{"type": "input_tokens_per_minute_cache_aware", "value": 30000.0},
				map[string]any{"type": "output_tokens_per_minute", "value": 8000.0},
			}},
		{"type": "rate_limit", "group": map[string]any{"type": "model_group", "display_name": "haiku"},
			"models": []any{"claude-haiku-4-5"},
			"limits": []any{
				map[string]any{"type": "requests_per_minute", "value": 50.0},
				map[string]any{"type": "input_tokens_per_minute", "value": 50000.0}, // cache reads count
				map[string]any{"type": "output_tokens_per_minute", "value": 10000.0},
			}},
	}
	if diff := cmp.Diff(want, entries); diff != "" {
		t.Errorf("entries (-want +got):\n%s", diff)
	}
}

func TestRateLimitsWithSDK(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{Groups: twoGroups(), AdminKeys: []string{adminKey}})
	admin := newClient(srv, option.WithAPIKey(adminKey))
	page, err := admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{})
	if err != nil {
		t.Fatalf("RateLimits.List: %v", err)
	}
	type entry struct {
		Group, GroupType, Type string
		Models                 []string
		Limits                 map[string]int64
	}
	summarize := func(rls []anthropic.OrganizationRateLimit) []entry {
		var out []entry
		for _, rl := range rls {
			e := entry{Group: rl.Group.AsModelGroup().DisplayName, GroupType: rl.Group.Type, Type: string(rl.Type),
				Models: rl.Models, Limits: map[string]int64{}}
			for _, l := range rl.Limits {
				e.Limits[l.Type] = l.Value
			}
			out = append(out, e)
		}
		return out
	}
	want := []entry{
		{"sonnet", "model_group", "rate_limit", []string{"claude-sonnet-4-5", "claude-sonnet-4-6"},
			map[string]int64{"requests_per_minute": 50, "input_tokens_per_minute_cache_aware": 30_000, "output_tokens_per_minute": 8_000}},
		{"haiku", "model_group", "rate_limit", []string{"claude-haiku-4-5"},
			map[string]int64{"requests_per_minute": 50, "input_tokens_per_minute": 50_000, "output_tokens_per_minute": 10_000}},
	}
	if diff := cmp.Diff(want, summarize(page.Data)); diff != "" {
		t.Errorf("rate limits (-want +got):\n%s", diff)
	}
	if page.NextPage != "" {
		t.Errorf("next_page %q: want none", page.NextPage)
	}

	// Filter by model (a listed name, or one the group's patterns match).
	for model, group := range map[string]string{"claude-sonnet-4-6": "sonnet", "claude-sonnet-9": "sonnet", "claude-haiku-4-5": "haiku"} {
		page, err := admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{Model: anthropic.String(model)})
		if err != nil || len(page.Data) != 1 || page.Data[0].Group.DisplayName != group {
			t.Errorf("model %s: %v, %+v: want the %s entry only", model, err, page, group)
		}
	}
	_, err = admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{Model: anthropic.String("gpt-4")})
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 {
		t.Errorf("unknown model: %v, want 404", err)
	}
	// Other group types: the fake has none.
	page, err = admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{
		GroupType: anthropic.OrganizationRateLimitListParamsGroupTypeBatch})
	if err != nil || len(page.Data) != 0 {
		t.Errorf("group_type batch: %v, %d entries: want none", err, len(page.Data))
	}

	// Pages of one, followed by the auto-pager.
	page, err = admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{Limit: anthropic.Int(1)})
	if err != nil || len(page.Data) != 1 || page.NextPage == "" {
		t.Fatalf("limit 1: %v, %+v: want one entry and a next_page", err, page)
	}
	var all []anthropic.OrganizationRateLimit
	pager := admin.Organization.RateLimits.ListAutoPaging(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{Limit: anthropic.Int(1)})
	for pager.Next() {
		all = append(all, pager.Current())
	}
	if err := pager.Err(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, summarize(all)); diff != "" {
		t.Errorf("auto-paged rate limits (-want +got):\n%s", diff)
	}

	// Lowered at runtime: reported and enforced.
	if err := fake.SetGroupLimits("sonnet", 2, 20_000, 0); err != nil {
		t.Fatal(err)
	}
	page, err = admin.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{})
	if err != nil {
		t.Fatal(err)
	}
	want[0].Limits = map[string]int64{"requests_per_minute": 2, "input_tokens_per_minute_cache_aware": 20_000, "output_tokens_per_minute": 8_000}
	if diff := cmp.Diff(want, summarize(page.Data)); diff != "" {
		t.Errorf("after SetGroupLimits (-want +got):\n%s", diff)
	}
}

func TestRateLimitsAuth(t *testing.T) {
	tests := []struct {
		name       string
		apiKeys    []string
		adminKeys  []string
		hdr        map[string]string
		wantStatus int
		wantType   string
		wantMsg    string
	}{
		{"admin key", nil, []string{adminKey}, map[string]string{"x-api-key": adminKey}, 200, "", ""},
		{"admin key as bearer", nil, []string{adminKey}, map[string]string{"Authorization": "Bearer " + adminKey}, 200, "", ""},
		{"no key", nil, []string{adminKey}, nil, 401, "authentication_error", "x-api-key header is required"},
		{"wrong admin key", nil, []string{adminKey}, map[string]string{"x-api-key": "sk-ant-admin01-other"}, 401, "authentication_error", "invalid x-api-key"},
		{"unknown key", []string{testKey}, []string{adminKey}, map[string]string{"x-api-key": "sk-nobody"}, 401, "authentication_error", "invalid x-api-key"},
		{"API key", []string{testKey}, []string{adminKey}, map[string]string{"x-api-key": testKey}, 403, "permission_error", ""},
		{"any API key when none configured", nil, []string{adminKey}, map[string]string{"x-api-key": "sk-ant-api03-whatever"}, 403, "permission_error", ""},
		{"no admin keys configured: any sk-ant-admin key", nil, nil, map[string]string{"x-api-key": "sk-ant-admin01-anything"}, 200, "", ""},
		{"no admin keys configured: API key", nil, nil, map[string]string{"x-api-key": testKey}, 403, "permission_error", ""},
		{"no anthropic-version", nil, []string{adminKey}, map[string]string{"x-api-key": adminKey, "anthropic-version": ""}, 400, "invalid_request_error", "anthropic-version: header is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, srv := newFake(t, fakeanthropic.Config{APIKeys: tt.apiKeys, AdminKeys: tt.adminKeys})
			res, b := getAdmin(t, srv, "/v1/organizations/rate_limits", tt.hdr)
			if res.StatusCode != tt.wantStatus {
				t.Fatalf("status %d: want %d (%s)", res.StatusCode, tt.wantStatus, b)
			}
			if tt.wantStatus == 200 {
				return
			}
			e := decodeError(t, res, b)
			if e.Error.Type != tt.wantType || (tt.wantMsg != "" && e.Error.Message != tt.wantMsg) {
				t.Errorf("error %s %q: want %s %q", e.Error.Type, e.Error.Message, tt.wantType, tt.wantMsg)
			}
		})
	}

	t.Run("SDK with an API key", func(t *testing.T) {
		_, srv := newFake(t, fakeanthropic.Config{APIKeys: []string{testKey}, AdminKeys: []string{adminKey}})
		client := newClient(srv)
		_, err := client.Organization.RateLimits.List(ctxWithTimeout(t), anthropic.OrganizationRateLimitListParams{})
		var apiErr *anthropic.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 403 || apiErr.Type() != "permission_error" {
			t.Fatalf("error %v: want *anthropic.Error 403 permission_error", err)
		}
	})
	t.Run("admin key on the Messages API", func(t *testing.T) {
		// Admin keys are for the Admin API; /v1/messages goes by APIKeys.
		_, srv := newFake(t, fakeanthropic.Config{APIKeys: []string{testKey}, AdminKeys: []string{adminKey}})
		if res, b := post(t, srv, "/v1/messages", rawBody("hi", 5, false), map[string]string{"x-api-key": adminKey}); res.StatusCode != 401 {
			t.Errorf("status %d (%s), want 401", res.StatusCode, b)
		}
	})
}

func TestRateLimitsQueryErrors(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{Groups: twoGroups(), AdminKeys: []string{adminKey}})
	for query, want := range map[string]string{
		"?limit=0":           "limit: Input should be greater than or equal to 1",
		"?limit=1001":        "limit: Input should be less than or equal to 1000",
		"?limit=x":           "limit: Input should be a valid integer",
		"?group_type=chat":   "group_type: Input should be 'batch', 'files', 'model_group', 'skills', 'token_count' or 'web_search'",
		"?page=not-a-cursor": "page: invalid page cursor",
	} {
		res, b := getAdmin(t, srv, "/v1/organizations/rate_limits"+query, map[string]string{"x-api-key": adminKey})
		if res.StatusCode != 400 {
			t.Errorf("%s: status %d (%s), want 400", query, res.StatusCode, b)
			continue
		}
		if e := decodeError(t, res, b); e.Error.Type != "invalid_request_error" || e.Error.Message != want {
			t.Errorf("%s: error %s %q, want invalid_request_error %q", query, e.Error.Type, e.Error.Message, want)
		}
	}
	// A page past the end is empty.
	res, b := getAdmin(t, srv, "/v1/organizations/rate_limits?page=rlp_5", map[string]string{"x-api-key": adminKey})
	if res.StatusCode != 200 || string(b) != `{"data":[],"next_page":null}` {
		t.Errorf("page past the end: %d %s", res.StatusCode, b)
	}
}

func TestSetLimitsEndpoint(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(10, 30_000, 8_000), Clock: clk.Now})
	// Use 4 of 10 requests, then lower the limit to 5: one request is left.
	for range 4 {
		if res, b := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != 200 {
			t.Fatalf("status %d: %s", res.StatusCode, b)
		}
	}
	res, b := post(t, srv, "/_fake/limits", `{"group":"claude","rpm":5,"output_tpm":4000}`, nil)
	if res.StatusCode != 200 {
		t.Fatalf("POST /_fake/limits: %d %s", res.StatusCode, b)
	}
	if want := `{"group":"claude","rpm":5,"input_tpm":30000,"output_tpm":4000}`; string(b) != want {
		t.Errorf("POST /_fake/limits answered %s, want %s", b, want)
	}
	res, _ = post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
	got := []string{res.Status, res.Header.Get("anthropic-ratelimit-requests-limit"), res.Header.Get("anthropic-ratelimit-requests-remaining"),
		res.Header.Get("anthropic-ratelimit-output-tokens-limit")}
	if diff := cmp.Diff([]string{"200 OK", "5", "0", "4000"}, got); diff != "" {
		t.Errorf("after lowering: status, requests limit and remaining, output limit (-want +got):\n%s", diff)
	}
	res, b = post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
	if res.StatusCode != 429 || res.Header.Get("retry-after") != "12" { // 60/5 s for one request
		t.Errorf("over the lowered limit: %d, retry-after %q: want 429 after 12 s", res.StatusCode, res.Header.Get("retry-after"))
	} else if e := decodeError(t, res, b); !strings.Contains(e.Error.Message, "of 5 requests per minute") {
		t.Errorf("429 message %q: want it to name the lowered limit", e.Error.Message)
	}
	if g := fake.Groups()[0]; g.RPM != 5 || g.InputTPM != 30_000 || g.OutputTPM != 4_000 {
		t.Errorf("Groups()[0] = %+v: want the lowered limits", g)
	}

	for body, want := range map[string]int{
		`{"group":"nope","rpm":5}`:    404,
		`{"group":"claude","rpm":-1}`: 400,
		`{"group":"claude","tpm":1}`:  400,
		`not json`:                    400,
	} {
		res, b := post(t, srv, "/_fake/limits", body, nil)
		if res.StatusCode != want {
			t.Errorf("POST /_fake/limits %s: %d %s, want %d", body, res.StatusCode, b, want)
			continue
		}
		decodeError(t, res, b)
	}
	if err := fake.SetGroupLimits("nope", 1, 1, 1); err == nil {
		t.Error("SetGroupLimits of an unknown group: no error")
	}
}
