"""PostgreSQL: schema migrations, connections, reader queries and the writer."""
