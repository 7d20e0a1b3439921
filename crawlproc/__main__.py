from crawlproc.cli import main

main()
