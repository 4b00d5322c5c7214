package api

import (
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/config"
)

func TestFitsGroup(t *testing.T) {
	reserved := &config.ModelGroup{Name: "sonnet", InputTPM: 30000, OutputTPM: 8000, OutputAccounting: config.OutputReserved}
	produced := &config.ModelGroup{Name: "sonnet", InputTPM: 30000, OutputTPM: 8000, OutputAccounting: config.OutputProduced}
	tests := []struct {
		name       string
		g          *config.ModelGroup
		maxTokens  int
		input      int
		wantField  string
		wantNumber string
	}{
		{"fits", reserved, 8000, 30000, "", ""},
		{"max_tokens above the output limit (reserved)", reserved, 8001, 10, "request.max_tokens", "8000"},
		{"max_tokens above the output limit (produced): accepted", produced, 8192, 10, "", ""},
		{"input above the input limit", reserved, 100, 30001, "request.messages", "30,000"},
		{"input above the input limit (produced)", produced, 100, 30001, "request.messages", "30,000"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := fitsLimits(&createRequest{Group: tc.g, MaxTokens: tc.maxTokens}, tc.input, nil, config.UserPolicy{})
			if tc.wantField == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			e, ok := err.(*Error)
			if !ok || e.Status != 400 || e.Field != tc.wantField || !strings.Contains(e.Message, tc.wantNumber) {
				t.Fatalf("err = %v", err)
			}
		})
	}
}

// TestPositiveInt: max_tokens is a whole JSON number from 1 to the
// maximum; the digits-only fast path and the decoder agree.
func TestPositiveInt(t *testing.T) {
	tests := []struct {
		raw  string
		want int // 0: refused
	}{
		{"1", 1}, {"1024", 1024}, {"128000", 128000}, {"128001", 0}, {"0", 0}, {"-5", 0},
		{"012", 0}, {"1.5", 0}, {"1e3", 0}, {"1.0e2", 0}, {`"12"`, 12}, {"99999999999999999999", 0},
		{"true", 0}, {"null", 0}, {"", 0},
	}
	for _, tc := range tests {
		n, err := positiveInt([]byte(tc.raw), 128000)
		if tc.want == 0 {
			if err == nil {
				t.Errorf("positiveInt(%s) = %d, want a refusal", tc.raw, n)
			}
			continue
		}
		if err != nil || n != tc.want {
			t.Errorf("positiveInt(%s) = %d, %v; want %d", tc.raw, n, err, tc.want)
		}
	}
}

// TestDecodeStrict: one JSON value and nothing after it, or an error.
func TestDecodeStrict(t *testing.T) {
	for _, in := range []string{`{"a":1}`, " {\"a\":1}\n\t"} {
		var v map[string]any
		if err := decodeStrict([]byte(in), &v); err != nil || v["a"] != 1.0 {
			t.Errorf("decodeStrict(%q) = %v, %v", in, v, err)
		}
	}
	for _, in := range []string{`{"a":1} {"b":2}`, `{"a":1}]`, `{"a":1}}`, `{"a":1`, ``, `{"a":1} x`} {
		var v map[string]any
		if err := decodeStrict([]byte(in), &v); err == nil {
			t.Errorf("decodeStrict(%q) accepted %v", in, v)
		}
	}
}
