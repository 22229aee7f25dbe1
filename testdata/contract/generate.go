package contract

// The Go client a user of openapi.json would generate; ./check.sh contract
// runs this before the tests, so the client always follows the document.
//go:generate go tool oapi-codegen -generate types,client -package client -o client/client.gen.go ../../openapi.json
