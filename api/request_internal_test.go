package api

import (
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/config"
)

func TestFitsGroup(t *testing.T) {
	g := &config.ModelGroup{Name: "sonnet", InputTPM: 30000, OutputTPM: 8000}
	tests := []struct {
		name       string
		maxTokens  int
		input      int
		wantField  string
		wantNumber string
	}{
		{"fits", 8000, 30000, "", ""},
		{"max_tokens above the output limit", 8001, 10, "request.max_tokens", "8000"},
		{"input above the input limit", 100, 30001, "request.messages", "30,000"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := fitsLimits(&createRequest{Group: g, MaxTokens: tc.maxTokens}, tc.input, nil, config.UserPolicy{})
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
