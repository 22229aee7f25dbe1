module addrservice

go 1.24
